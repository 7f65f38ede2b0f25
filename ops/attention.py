"""Attention over the token-slot KV pool, as custom ops.

Models call `attention(...)`, which is one `kiln::attention` op: opaque to
Dynamo, so the compiler can split the model graph at it. Inside, it stores the
step's K/V (`kiln::store_kv`) and runs `kiln::decode_attention` when every
request has at most one new token, else `kiln::extend_attention`. Each of those
ops has a plain-torch kernel (CPU, `attention_torch.py`) and, where Triton is
installed, a Triton kernel for CUDA (`attention_triton.py`); every op picks by
device from one table. Both are tested against `attention_ref.py`. A compiled
model on the CPU decodes with `attention_decode_cpu.py` instead, a C++
kernel that stores the step's K/V and reads the pool in place (the compiler
sets `inplace_decode`); once that kernel is built, `attention_cpu_op.cpp`
implements the op for the CPU and calls it without entering Python.

Batch layout: the T query rows are the requests' new tokens back to back
(request i owns ``extend_lens[i]`` rows from ``extend_starts[i]``), followed by
padding rows. After this step request i holds ``seq_lens[i]`` tokens in the
pool, whose slots are ``req_to_token[req_indices[i], :seq_lens[i]]``; its new
tokens are the last ``extend_lens[i]`` of those. Padding rows and padding
requests (``extend_lens == 0``) write to scratch slot 0 and produce zeros.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kiln.ops.attention_decode_cpu import decode_inplace
from kiln.ops.attention_torch import decode_torch, extend_torch, store_kv_torch


@dataclass
class AttentionMetadata:
    """Per-batch tensors every attention layer reads."""

    out_slots: Tensor  # [T] int64: pool slot that receives each row's K/V
    req_to_token: Tensor  # [max_requests, max_context] int32: the whole slot table
    req_indices: Tensor  # [B] int64: row of req_to_token for each request
    seq_lens: Tensor  # [B] int64: tokens in the pool after this step
    extend_lens: Tensor  # [B] int64: new tokens in this batch
    extend_starts: Tensor  # [B] int64: first query row of each request
    # [1] int64 on the CPU: the most new tokens of any request. Kernels size their
    # grids by it and pick decode or extend, without reading the GPU.
    max_extend_len: Tensor

    @classmethod
    def build(
        cls,
        out_slots: Tensor,
        req_to_token: Tensor,
        req_indices: Sequence[int],
        seq_lens: Sequence[int],
        extend_lens: Sequence[int],
    ) -> "AttentionMetadata":
        """From host-side lists, on req_to_token's device."""
        dev = req_to_token.device
        starts = [0]
        for n in extend_lens[:-1]:
            starts.append(starts[-1] + n)
        as_tensor = lambda xs: torch.tensor(list(xs), dtype=torch.int64, device=dev)  # noqa: E731
        return cls(
            out_slots=out_slots.to(dev, torch.int64),
            req_to_token=req_to_token,
            req_indices=as_tensor(req_indices),
            seq_lens=as_tensor(seq_lens),
            extend_lens=as_tensor(extend_lens),
            extend_starts=as_tensor(starts[: len(extend_lens)]),
            max_extend_len=torch.tensor([max(extend_lens, default=0)], dtype=torch.int64),
        )

    @classmethod
    def padding(cls, size: int, req_to_token: Tensor) -> "AttentionMetadata":
        """`size` padding rows and padding requests (no tokens, slot 0): the batch that warm-up
        and graph capture run, and whose buffers a replay overwrites."""
        zeros = lambda: torch.zeros(size, dtype=torch.int64, device=req_to_token.device)  # noqa: E731
        return cls(zeros(), req_to_token, zeros(), zeros(), zeros(), zeros(), torch.zeros(1, dtype=torch.int64))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _extend_torch(q, k_cache, v_cache, req_to_token, req_indices, seq_lens, extend_lens, extend_starts, max_extend_len, scale, causal, sliding_window, logit_cap):
    return extend_torch(q, k_cache, v_cache, req_to_token, req_indices, seq_lens, extend_lens, scale, causal, sliding_window, logit_cap)


# Per device type: (store, decode, extend) over one layer's caches. Every op below picks
# its kernel here; a GPU without Triton runs the torch ones.
_KERNELS = {"cpu": (store_kv_torch, decode_torch, _extend_torch)}
if _triton_available():
    from kiln.ops import attention_triton as _tri

    _KERNELS["cuda"] = (_tri.store_kv_triton, _tri.decode_triton, _tri.extend_triton)


def _kernels(t: Tensor) -> tuple[Callable[..., None], Callable[..., Tensor], Callable[..., Tensor]]:
    return _KERNELS["cuda" if t.is_cuda and "cuda" in _KERNELS else "cpu"]


@torch.library.custom_op("kiln::store_kv", mutates_args=("k_cache", "v_cache"))
def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int, slots: Tensor) -> None:
    """k, v: [T, KVH, D] into layer `layer` of the caches [layers, slots, KVH, D], at `slots`."""
    _kernels(k)[0](k, v, k_cache[layer], v_cache[layer], slots)


@torch.library.custom_op("kiln::decode_attention", mutates_args=())
def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int,
    logit_cap: float,
) -> Tensor:
    """One query row per request (row b is request b); q: [B, H, D]."""
    return _kernels(q)[1](q, k_cache[layer], v_cache[layer], req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap)


@torch.library.custom_op("kiln::extend_attention", mutates_args=())
def extend_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    extend_lens: Tensor,
    extend_starts: Tensor,
    max_extend_len: int,
    scale: float,
    causal: bool,
    sliding_window: int,
    logit_cap: float,
) -> Tensor:
    """Any number of new tokens per request, over the cached prefix and themselves."""
    return _kernels(q)[2](
        q, k_cache[layer], v_cache[layer], req_to_token, req_indices, seq_lens, extend_lens, extend_starts,
        max_extend_len, scale, causal, sliding_window, logit_cap,
    )  # fmt: skip


@decode_attention.register_fake
def _(q, k_cache, v_cache, layer, req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap):
    return torch.empty_like(q)


@extend_attention.register_fake
def _(q, k_cache, v_cache, layer, req_to_token, req_indices, seq_lens, extend_lens, extend_starts, max_extend_len, scale, causal, sliding_window, logit_cap):
    return torch.empty_like(q)


# kiln::attention is declared with torch.library's plain define/impl rather than
# @custom_op: on the CPU the decorator's Python layers cost about 0.25 ms a call, as
# much as a short batch's whole decode attention, 30 times a step.
# On the CPU, once a compiled model's decode kernel is built, a C++ kernel (attention_cpu_op.cpp) takes the op's
# calls and runs decode steps itself; it hands every other call to `attention_py`, the same Python kernel.
_lib = torch.library.Library("kiln", "FRAGMENT")
_ARGS = (
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, Tensor out_slots, "
    "Tensor req_to_token, Tensor req_indices, Tensor seq_lens, Tensor extend_lens, Tensor extend_starts, "
    "Tensor max_extend_len, float scale, bool causal, int sliding_window, float logit_cap, bool inplace_decode=False) -> Tensor"
)
_lib.define("attention" + _ARGS)
_lib.define("attention_py" + _ARGS)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    layer: int,
    out_slots: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    extend_lens: Tensor,
    extend_starts: Tensor,
    max_extend_len: Tensor,
    scale: float,
    causal: bool,
    sliding_window: int,
    logit_cap: float,
    inplace_decode: bool = False,
) -> Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [layers, slots, KVH, D]. Returns [T, H, D].
    `inplace_decode`: on the CPU, decode with the C++ kernel over the pool (set by the compiler)."""
    # The kernels are called directly rather than through the three ops above: on the
    # CPU, nested custom-op dispatch costs about as much as decode attention itself.
    store, decode, extend = _kernels(q)
    kc, vc = k_cache[layer], v_cache[layer]
    longest = int(max_extend_len[0])
    # A single new token sees every earlier one, causal or not, so decode serves both.
    decoding = longest <= 1 and q.shape[0] == req_indices.shape[0]
    if decoding and inplace_decode and not q.is_cuda:  # the C++ kernel stores the step's K/V itself
        return decode_inplace(q, kc, vc, req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap, (k, v, out_slots))
    store(k, v, kc, vc, out_slots)
    q = q.contiguous()
    if decoding:
        return decode(q, kc, vc, req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap)
    return extend(
        q, kc, vc, req_to_token, req_indices, seq_lens, extend_lens, extend_starts, longest, scale, causal, sliding_window, logit_cap
    )


_lib.impl("attention", _attention, "CompositeExplicitAutograd")
_lib.impl("attention_py", _attention, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::attention")
def _(q, k, v, k_cache, v_cache, layer, out_slots, req_to_token, req_indices, seq_lens, extend_lens, extend_starts, max_extend_len, scale, causal, sliding_window, logit_cap, inplace_decode=False):
    return torch.empty_like(q)


attention_op = torch.ops.kiln.attention.default


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv: tuple[Tensor, Tensor],
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    causal: bool = True,
    sliding_window: int = 0,
    logit_cap: float = 0.0,
) -> Tensor:
    """What a model calls: stores this step's K/V for `layer`, then attends. `sliding_window`
    (tokens, 0 = off) and `logit_cap` (0 = off) are per-layer constants."""
    return attention_op(
        q, k, v, kv[0], kv[1], layer,
        meta.out_slots, meta.req_to_token, meta.req_indices, meta.seq_lens, meta.extend_lens,
        meta.extend_starts, meta.max_extend_len, scale, causal, sliding_window, logit_cap,
    )  # fmt: skip
