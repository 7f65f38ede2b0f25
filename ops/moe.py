"""Mixture-of-experts feed-forward as one custom op, `kiln::moe`.

Routing has data-dependent shapes (how many tokens each expert gets), so the whole
layer is one op, opaque to Dynamo: the compiled pieces around it see a [T, H] input
and a [T, H] output, whatever the routing. Inside: the router's softmax top-k with
the model's normalisation, the (token, expert) pairs sorted by expert, one grouped
GEMM pair per expert, and the routing-weighted sum back in token order.

The op also adds each expert's token count into `expert_counts` (the expert
distribution recorder reads it), inside the compiled forward: no graph break and no
host sync per layer. Only the first `num_tokens` rows are real; the rest are bucket
padding, neither computed (CPU) nor counted.

The CPU kernel is below; CUDA runs the Triton one (`moe_triton.py`). Both are tested
against `moe_ref.py`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.ops.linear import linear
from kiln.ops.moe_routing import route


def moe_torch(
    x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int, renormalize: bool, num_tokens: Tensor, expert_counts: Tensor
) -> Tensor:
    """x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; expert_counts: [E] int64."""
    n = int(num_tokens)  # free on the CPU, and it spares the padding rows every GEMM
    out = torch.zeros_like(x)
    if n == 0:
        return out
    weights, ids = route(router_logits[:n], top_k, renormalize)
    flat = ids.flatten()
    per_expert = torch.bincount(flat, minlength=w13.shape[0])
    expert_counts += per_expert
    order = flat.argsort(stable=True)
    tokens = order // top_k
    pair_weights = weights.flatten()[order].to(x.dtype)
    start = 0
    for expert, end in enumerate(per_expert.cumsum(0).tolist()):
        if end == start:
            continue
        rows = tokens[start:end]
        gate, up = linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, w2[expert]) * pair_weights[start:end, None]
        out.index_add_(0, rows, y)
        start = end
    return out


_KERNELS: dict[str, Callable[..., Tensor]] = {"cpu": moe_torch}
try:
    from kiln.ops.moe_triton import moe_triton
except ImportError:  # no Triton: a GPU runs the torch kernel
    pass
else:
    _KERNELS["cuda"] = moe_triton


def _moe(
    x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int, renormalize: bool, num_tokens: Tensor, expert_counts: Tensor
) -> Tensor:
    kernel = _KERNELS["cuda"] if x.is_cuda and "cuda" in _KERNELS else moe_torch
    return kernel(x, router_logits, w13, w2, top_k, renormalize, num_tokens, expert_counts)


# Plain define/impl, as kiln::attention: @custom_op's Python layers cost more than a decode step's MoE.
_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "moe(Tensor x, Tensor router_logits, Tensor w13, Tensor w2, int top_k, bool renormalize, "
    "Tensor num_tokens, Tensor(a!) expert_counts) -> Tensor"
)
_lib.impl("moe", _moe, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::moe")
def _(x, router_logits, w13, w2, top_k, renormalize, num_tokens, expert_counts):
    return torch.empty_like(x)


def moe(
    x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int, renormalize: bool, num_tokens: Tensor, expert_counts: Tensor
) -> Tensor:
    """What a model calls; `num_tokens` (a 0-d or [1] int64 tensor) is how many leading rows are real."""
    return torch.ops.kiln.moe(x, router_logits, w13, w2, top_k, renormalize, num_tokens, expert_counts)
