"""The one readable reference every attention path is tested against.

Float32, one request at a time, with the whole mask written out. Slow on
purpose: it is the definition, not a kernel.
"""

import torch
from torch import Tensor


def attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    extend_lens: Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int = 0,
    logit_cap: float = 0.0,
) -> Tensor:
    """q: [T, H, D] (the requests' new tokens back to back, then padding rows);
    k_cache, v_cache: [slots, KVH, D] for one layer, already holding this step's K/V.

    Request i's new tokens are the last ``extend_lens[i]`` of its ``seq_lens[i]``
    tokens, whose slots are ``req_to_token[req_indices[i], :seq_lens[i]]``.
    A query at position p sees key position j when j <= p (causal), and
    p - j < sliding_window (when the window is on). Scores are soft-capped as
    ``cap * tanh(s / cap)`` before the softmax. Padding rows come out zero.
    """
    out = torch.zeros(q.shape, dtype=torch.float32)
    group = q.shape[1] // k_cache.shape[1]
    row = 0
    for i in range(len(extend_lens)):
        new, total = int(extend_lens[i]), int(seq_lens[i])
        if new == 0:
            continue
        slots = req_to_token[int(req_indices[i]), :total].long().cpu()
        k = k_cache.cpu()[slots].float().repeat_interleave(group, dim=1)  # [total, H, D]
        v = v_cache.cpu()[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[row : row + new].cpu().float(), k) * scale
        if logit_cap > 0:
            scores = logit_cap * torch.tanh(scores / logit_cap)
        q_pos = torch.arange(total - new, total)[:, None]
        k_pos = torch.arange(total)[None, :]
        allowed = torch.ones(new, total, dtype=torch.bool)
        if causal:
            allowed &= k_pos <= q_pos
        if sliding_window > 0:
            allowed &= q_pos - k_pos < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[row : row + new] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        row += new
    return out.to(q.dtype)
