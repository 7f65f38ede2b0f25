"""The router's top-k, shared by the CPU and Triton MoE kernels."""

import torch
from torch import Tensor


def route(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax in float32 over all experts, top-k, optionally renormalised (Mixtral, Qwen3's `norm_topk_prob`).
    Returns (weights float32 [T, top_k], expert ids int64 [T, top_k])."""
    weights, ids = torch.topk(torch.softmax(router_logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
