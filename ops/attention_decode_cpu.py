"""Decode attention that reads the slot pool in place on the CPU: Inductor's fused kernel, for compiled models.

`decode_torch` gathers each request's K/V out of the pool (and, without native bfloat16, converts them to
float32) before SDPA: at batch 32 over 1,000 tokens that copying is most of the attention time. Written as
plain torch math over `k_cache[slots]`, Inductor turns the gather, the dot products, the masked softmax and
the weighted sum into one C++ loop nest that loads K/V rows straight from the pool and upcasts them in
registers. The compiler lowers `kiln::attention` to it (see compiler/piecewise.py); eager models keep SDPA,
since compiling it costs seconds that `--disable-compile` users asked not to pay.

Two compiled variants per dtype and head shape serve every batch and context width with no recompile (below);
the width is padded to at least 2, as Dynamo specialises a size of 1.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, seq_lens: Tensor, scale: Tensor, sliding_window: Tensor, logit_cap: Tensor) -> Tensor:
    """q: [B, H, D]; caches: [slots, KVH, D]; slots: [B, W] int64 (pool rows, 0 past a request's length).
    The per-layer constants come as 0-d tensors: as Python numbers each value would be a compiled variant."""
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    q = q.float().view(batch, 1, kv_heads, heads // kv_heads, dim)
    scores = (q * k_cache[slots].float()[:, :, :, None, :]).sum(-1) * scale  # [B, W, KVH, G]
    scores = torch.where(logit_cap > 0, logit_cap * torch.tanh(scores / logit_cap), scores)
    lens = seq_lens[:, None]
    pos = torch.arange(slots.shape[1], device=q.device)[None, :]
    seen = (pos < lens) & ((sliding_window <= 0) | (pos >= lens - sliding_window))
    seen |= (pos == 0) & (lens == 0)  # an empty (padding) request sees slot 0, not nothing (NaN), and is zeroed below
    probs = scores.masked_fill(~seen[:, :, None, None], float("-inf")).softmax(dim=1)
    # Slots past a request's length may hold anything, NaN included, and 0 * NaN is NaN: masked, not multiplied.
    values = v_cache[slots].float().masked_fill(~seen[:, :, None, None], 0)[:, :, :, None, :]
    out = (probs[..., None] * values).sum(1)  # [B, KVH, G, D]
    return out.masked_fill((seq_lens == 0)[:, None, None, None], 0).reshape(batch, heads, dim)


# Inductor runs the outermost loop, the requests, in parallel: for one request that is one thread, so one
# request gets its own variant with static sizes (except the pool's and the width), where it splits the
# keys and heads instead.
_one_request = torch.compile(_decode, dynamic=False, fullgraph=True)
_any_batch = torch.compile(_decode, dynamic=True, fullgraph=True)

# Variant key -> the variant traced ahead of time (aot_compile) and saved in the compile cache folder, which
# warm-up loads instead of tracing again. Held here because the op that calls them takes only tensors.
_saved: dict[tuple[object, ...], Callable[..., Tensor]] = {}


def _variant(q: Tensor, k_cache: Tensor) -> tuple[object, ...]:
    return (q.shape[0] == 1, q.dtype, q.shape[1], q.shape[2], k_cache.shape[1], k_cache.dtype)


def _mark_one_request_dynamic(slots: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
    for t, dim in ((slots, 1), (k_cache, 0), (v_cache, 0)):
        torch._dynamo.mark_dynamic(t, dim)


def decode_inplace(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int,
    logit_cap: float,
) -> Tensor:
    """decode_torch's contract (row b is request b's one new token), reading K/V where they lie."""
    width = max(int(seq_lens.max()), 2)
    slots = req_to_token[req_indices, :width].long()
    consts = (torch.tensor(scale), torch.tensor(sliding_window), torch.tensor(logit_cap))
    fn = _saved.get(_variant(q, k_cache))
    if fn is None and q.shape[0] > 1:
        fn = _any_batch
    elif fn is None:
        _mark_one_request_dynamic(slots, k_cache, v_cache)
        fn = _one_request
    return fn(q, k_cache, v_cache, slots, seq_lens, *consts).to(q.dtype)


def prepare_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, folder: Path | None) -> int:
    """Both variants for one layer kind, ready before serving freezes compilation: loaded from `folder` when an
    earlier start saved them there, else traced ahead of time, compiled and saved there. Returns how many were
    loaded. q is [H, D] in the model's dtype; k_cache, v_cache one layer of the pool. The variants skip
    Dynamo's guards: `_variant` picks them by everything the trace specialised on, and the folder's key
    (compiler/cache.py) covers the rest."""
    loaded = 0
    for batch in (1, 2):
        qb = q.expand(batch, *q.shape).contiguous()
        key = _variant(qb, k_cache)
        _, q_dtype, heads, dim, kv_heads, kv_dtype = key
        path = Path(folder or ".") / f"decode-{'one' if batch == 1 else 'any'}-{q_dtype}-{heads}x{dim}-{kv_heads}-{kv_dtype}.bin".replace("torch.", "")
        if folder is not None and path.exists():
            with open(path, "rb") as f:
                fn = torch.compiler.load_compiled_function(f)
            loaded += 1
        else:
            slots = torch.zeros(batch, 3, dtype=torch.int64)
            lens = torch.full((batch,), 3, dtype=torch.int64)
            if batch == 1:
                _mark_one_request_dynamic(slots, k_cache, v_cache)
            consts = (torch.tensor(1.0), torch.tensor(0), torch.tensor(0.0))
            fn = (_one_request if batch == 1 else _any_batch).aot_compile(((qb, k_cache, v_cache, slots, lens, *consts), {}))
            if folder is not None:
                fn.save_compiled_function(str(path))
        fn.disable_guard_check()
        _saved[key] = fn
    return loaded
