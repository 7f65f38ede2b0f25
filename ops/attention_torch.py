"""Attention over the slot pool in plain torch: the CPU path (and the fallback on a GPU without Triton).

Built on SDPA so oneDNN's fused kernels do the work; soft-capped logits take an
explicit matmul path, since SDPA has no cap. These functions read host values
(lengths as Python ints), which is free on the CPU.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def store_kv_torch(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> None:
    """k, v: [T, KVH, D] into k_cache, v_cache: [slots, KVH, D] at rows `slots`."""
    k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slots, v.to(v_cache.dtype))


# Read once. Without native bfloat16 (no AVX512-BF16 or AMX), the CPU's SDPA runs 2 to 3x faster on float32
# copies of bfloat16 K/V than on the K/V themselves (decode of 9 heads on a 2-core Xeon: 1 request over 1,000
# tokens 0.55 against 1.16 ms; 32 over 1,000 tokens 15.7 against 32.3 ms).
# (oneDNN's own "bf16 supported" says yes on any AVX-512 CPU: it emulates.)
UPCAST_BF16 = not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _upcast(t: Tensor) -> Tensor:
    return t.float() if UPCAST_BF16 and t.dtype == torch.bfloat16 and t.device.type == "cpu" else t


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, logit_cap: float) -> Tensor:
    """q: [..., H, Q, D]; k, v: [..., KVH, K, D] (after `_upcast`); mask: True where a key is seen. Output in k's dtype."""
    if logit_cap <= 0:
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k = k.float().repeat_interleave(group, dim=-3)
    v = v.float().repeat_interleave(group, dim=-3)
    scores = q.float() @ k.transpose(-1, -2) * scale
    scores = logit_cap * torch.tanh(scores / logit_cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(k.dtype)


def decode_torch(
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
    """Row b is request b's one new token (rows == requests); requests of length 0 give zeros."""
    batch, width = q.shape[0], max(int(seq_lens.max()), 1)
    # One index_select over flat slots: several times faster than indexing with the [B, W] table.
    slots = req_to_token[req_indices, :width].flatten().long()
    keys = _upcast(k_cache.index_select(0, slots)).unflatten(0, (batch, width)).transpose(1, 2)  # [B, KVH, W, D]
    vals = _upcast(v_cache.index_select(0, slots)).unflatten(0, (batch, width)).transpose(1, 2)
    if sliding_window <= 0 and int(seq_lens.min()) == width:  # every key seen: no mask to build or apply
        return _attend(q[:, :, None], keys, vals, None, scale, logit_cap).squeeze(2).to(q.dtype)
    k_pos = torch.arange(width, device=q.device)[None, :]
    seen = k_pos < seq_lens[:, None]
    if sliding_window > 0:
        seen &= k_pos >= seq_lens[:, None] - sliding_window
    # A request with no tokens would be a fully masked row (NaN in SDPA): let it
    # see slot 0 and zero its output afterwards.
    empty = seq_lens == 0
    seen[:, 0] |= empty
    o = _attend(q[:, :, None], keys, vals, seen[:, None, None, :], scale, logit_cap).squeeze(2)
    return o.masked_fill(empty[:, None, None], 0).to(q.dtype)


# Prompt rows attend in blocks of QUERY_BLOCK positions aligned to absolute positions, each block padded
# to its full size and reading keys up to its own end. A prompt position then meets the same kernel shapes
# whether its prefix came from the radix cache, an earlier chunk or this step: SDPA rounds differently at one
# or two query rows and at other key counts, and in bfloat16 one flipped bit grows over the layers into
# scores several percent apart. With it, prompt logprobs and /v1/score do not depend on the cache.
QUERY_BLOCK = 32


def extend_torch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    extend_lens: Tensor,
    scale: float,
    causal: bool,
    sliding_window: int,
    logit_cap: float,
) -> Tensor:
    """Each request's new tokens attend to its cached prefix and to each other."""
    out = torch.zeros_like(q)
    start = 0
    for row, total, new in zip(req_indices.tolist(), seq_lens.tolist(), extend_lens.tolist()):
        if new == 0:
            continue
        slots = req_to_token[row, :total].long()
        keys, vals = _upcast(k_cache[slots]), _upcast(v_cache[slots])  # [L, KVH, D]
        rows = q[start : start + new]
        if causal and new > 1:
            o = _attend_blocks(rows, keys, vals, total - new, scale, sliding_window, logit_cap)
        else:  # bidirectional, or a decoding request's one new token, which sees every earlier one
            mask = None
            if sliding_window > 0:
                q_pos = torch.arange(total - new, total, device=q.device)[:, None]
                k_pos = torch.arange(total, device=q.device)[None, :]
                mask = q_pos - k_pos < sliding_window
            o = _attend(rows.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), mask, scale, logit_cap).transpose(0, 1)
        out[start : start + new] = o.to(out.dtype)
        start += new
    return out


def _attend_blocks(q: Tensor, keys: Tensor, vals: Tensor, first: int, scale: float, sliding_window: int, logit_cap: float) -> Tensor:
    """q: [n, H, D] at positions first..first+n-1; keys, vals: [first+n, KVH, D]. Causal, in aligned blocks."""
    total = keys.shape[0]
    lo = first // QUERY_BLOCK * QUERY_BLOCK
    end = -(-total // QUERY_BLOCK) * QUERY_BLOCK
    q = F.pad(q, (0, 0, 0, 0, first - lo, end - total)).transpose(0, 1)  # [H, end - lo, D]
    keys = F.pad(keys, (0, 0, 0, 0, 0, end - total)).transpose(0, 1)  # [KVH, end, D]
    vals = F.pad(vals, (0, 0, 0, 0, 0, end - total)).transpose(0, 1)
    # Padding rows past the prompt see what its last row sees, so no row is fully masked.
    q_pos = torch.arange(lo, end, device=q.device).clamp(max=total - 1)[:, None]
    k_pos = torch.arange(end, device=q.device)[None, :]
    seen = k_pos <= q_pos
    if sliding_window > 0:
        seen &= q_pos - k_pos < sliding_window
    blocks = []
    for b in range(0, end - lo, QUERY_BLOCK):
        stop = lo + b + QUERY_BLOCK
        rows = slice(b, b + QUERY_BLOCK)
        blocks.append(_attend(q[:, rows], keys[:, :stop], vals[:, :stop], seen[rows, :stop], scale, logit_cap))
    return torch.cat(blocks, dim=1)[:, first - lo : first - lo + total - first].transpose(0, 1)
