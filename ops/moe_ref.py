"""The readable mixture-of-experts reference the CPU and Triton kernels are tested against: one token at a time."""

import torch
import torch.nn.functional as F
from torch import Tensor


def route_reference(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over all experts in float32, the `top_k` largest, optionally rescaled to sum to one.
    Returns (weights float32 [T, top_k], expert ids int64 [T, top_k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int, renormalize: bool) -> Tensor:
    """x: [T, H]; router_logits: [T, E]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I].
    Each token's output is the routing-weighted sum of its experts' SiLU-gated MLPs."""
    weights, ids = route_reference(router_logits, top_k, renormalize)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            gate, up = F.linear(x[t], w13[e]).chunk(2)
            y = F.linear(F.silu(gate) * up, w2[e])
            out[t] += (y * weights[t, j].to(x.dtype)).to(x.dtype)
    return out
