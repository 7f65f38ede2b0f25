"""Attention over the token-slot KV pool, as one custom op.

The op is opaque to Dynamo, so the compiler can split the model graph at it.
Everything it needs arrives as tensors (plus the layer index and two
per-model constants), so nothing per-batch hides in globals.

Batch layout: the T query rows are the requests' new tokens back to back
(request i owns ``extend_lens[i]`` rows), followed by padding rows. After this
step request i holds ``seq_lens[i]`` tokens in the pool, whose slots are
``req_to_token[req_indices[i], :seq_lens[i]]``; its new tokens are the last
``extend_lens[i]`` of those. Padding rows and padding requests
(``extend_lens == 0``) write to scratch slot 0 and produce zeros.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AttentionMetadata:
    """Per-batch tensors every attention layer reads."""

    out_slots: Tensor  # [T] int64: pool slot that receives each row's K/V
    req_to_token: Tensor  # [max_requests, max_context] int32: the whole slot table
    req_indices: Tensor  # [B] int64: row of req_to_token for each request
    seq_lens: Tensor  # [B] int64: tokens in the pool after this step
    extend_lens: Tensor  # [B] int64: new tokens in this batch


@torch.library.custom_op("kiln::attention", mutates_args=("k_cache", "v_cache"))
def attention(
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
    scale: float,
    causal: bool,
) -> Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; caches: [layers, slots, KVH, D]. Returns [T, H, D]."""
    kc, vc = k_cache[layer], v_cache[layer]
    kc.index_copy_(0, out_slots, k.to(kc.dtype))
    vc.index_copy_(0, out_slots, v.to(vc.dtype))
    return attend_torch(q, kc, vc, req_to_token, req_indices, seq_lens, extend_lens, scale, causal)


@attention.register_fake
def _(q, k, v, k_cache, v_cache, layer, out_slots, req_to_token, req_indices, seq_lens, extend_lens, scale, causal):
    return torch.empty_like(q)


def attend_torch(
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    extend_lens: Tensor,
    scale: float,
    causal: bool,
) -> Tensor:
    """Plain-torch attention for one layer whose K/V are already in the pool.

    Single-token requests are batched into one padded SDPA call (the decode
    case); longer extends run one SDPA call each with an offset causal mask.
    A batch of single-token requests only takes a path free of per-request
    Python work, since it runs for every layer of every decode step.
    """
    max_ext, num_tokens, max_len = torch.stack([extend_lens.max(), extend_lens.sum(), seq_lens.max()]).tolist()
    if max_ext == 1 and causal:
        return _decode(q, kc, vc, req_to_token, req_indices, seq_lens, num_tokens, max_len, scale)
    out = torch.zeros_like(q)
    ext = extend_lens.tolist()
    lens = seq_lens.tolist()
    rows = req_indices.tolist()
    starts = [0]
    for n in ext:
        starts.append(starts[-1] + n)

    single = [i for i, n in enumerate(ext) if n == 1]
    if single:
        idx = torch.tensor(single, dtype=torch.long, device=q.device)
        blens = seq_lens[idx]
        width = max(lens[i] for i in single)
        slots = req_to_token[req_indices[idx], :width].long()  # [B, W]
        keys = kc[slots].transpose(1, 2)  # [B, KVH, W, D]
        vals = vc[slots].transpose(1, 2)
        first = torch.tensor([starts[i] for i in single], device=q.device)
        qs = q[first].unsqueeze(2)  # [B, H, 1, D]
        mask = (torch.arange(width, device=q.device)[None, :] < blens[:, None])[:, None, None, :]
        o = F.scaled_dot_product_attention(qs.to(keys.dtype), keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
        out[first] = o.squeeze(2).to(out.dtype)

    for i, n in enumerate(ext):
        if n <= 1:
            continue
        length = lens[i]
        slots = req_to_token[rows[i], :length].long()
        keys = kc[slots].transpose(0, 1)  # [KVH, L, D]
        vals = vc[slots].transpose(0, 1)
        qs = q[starts[i] : starts[i] + n].transpose(0, 1)  # [H, n, D]
        mask = None
        if causal and n < length:
            qpos = torch.arange(length - n, length, device=q.device)
            mask = torch.arange(length, device=q.device)[None, :] <= qpos[:, None]
        # Without a cached prefix the mask is plain causal, which SDPA's fused kernels take as a flag.
        is_causal = causal and n == length
        o = F.scaled_dot_product_attention(qs.to(keys.dtype), keys, vals, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True)
        out[starts[i] : starts[i] + n] = o.transpose(0, 1).to(out.dtype)
    return out


def _decode(
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    num_tokens: int,
    max_len: int,
    scale: float,
) -> Tensor:
    """Every request has at most one new token; those with one come first, padding requests last."""
    slots = req_to_token[req_indices[:num_tokens], :max_len].long()  # [B, W]
    keys = kc[slots].transpose(1, 2)  # [B, KVH, W, D]
    vals = vc[slots].transpose(1, 2)
    mask = (torch.arange(max_len, device=q.device)[None, :] < seq_lens[:num_tokens, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:num_tokens, :, None].to(keys.dtype), keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
    o = o.squeeze(2).to(q.dtype)
    if num_tokens == q.shape[0]:
        return o
    return torch.cat([o, q.new_zeros((q.shape[0] - num_tokens, *q.shape[1:]))])
