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


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, logit_cap: float, is_causal: bool = False) -> Tensor:
    """q: [..., H, Q, D]; k, v: [..., KVH, K, D]; mask: True where a key is seen."""
    if UPCAST_BF16 and k.dtype == torch.bfloat16 and k.device.type == "cpu":
        return _attend(q.float(), k.float(), v.float(), mask, scale, logit_cap, is_causal).to(k.dtype)
    if logit_cap <= 0:
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k = k.float().repeat_interleave(group, dim=-3)
    v = v.float().repeat_interleave(group, dim=-3)
    scores = q.float() @ k.transpose(-1, -2) * scale
    scores = logit_cap * torch.tanh(scores / logit_cap)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
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
    keys = k_cache.index_select(0, slots).unflatten(0, (batch, width)).transpose(1, 2)  # [B, KVH, W, D]
    vals = v_cache.index_select(0, slots).unflatten(0, (batch, width)).transpose(1, 2)
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
    """Each request's new tokens attend to its cached prefix and to each other; one SDPA call a request."""
    out = torch.zeros_like(q)
    start = 0
    for row, total, new in zip(req_indices.tolist(), seq_lens.tolist(), extend_lens.tolist()):
        if new == 0:
            continue
        slots = req_to_token[row, :total].long()
        keys = k_cache[slots].transpose(0, 1)  # [KVH, L, D]
        vals = v_cache[slots].transpose(0, 1)
        qs = q[start : start + new].transpose(0, 1)  # [H, n, D]
        mask, plain_causal = None, False
        if causal and new == total and sliding_window <= 0:
            plain_causal = True  # SDPA's fused kernels take this as a flag
        elif causal or sliding_window > 0:
            q_pos = torch.arange(total - new, total, device=q.device)[:, None]
            k_pos = torch.arange(total, device=q.device)[None, :]
            mask = k_pos <= q_pos if causal else torch.ones(new, total, dtype=torch.bool, device=q.device)
            if sliding_window > 0:
                mask &= q_pos - k_pos < sliding_window
        o = _attend(qs, keys, vals, mask, scale, logit_cap, is_causal=plain_causal)
        out[start : start + new] = o.transpose(0, 1).to(out.dtype)
        start += new
    return out
