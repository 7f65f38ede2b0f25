"""The tensor-parallel collectives the models call: functional collectives, so that Dynamo traces them into
the graph (no graph break) and Inductor lowers them inside a compiled piece; identity at size 1.

With gloo on the CPU they run under torch.compile as they are (torch 2.13): Inductor emits the
`_c10d_functional` all-reduce and its wait inside the piece's code.
"""

import torch.distributed._functional_collectives as fc
from torch import Tensor

from kiln.ops.tensor_parallel import TensorParallel


def all_reduce(x: Tensor, tp: TensorParallel) -> Tensor:
    """The sum of every rank's x (row-parallel outputs, the vocab-parallel embedding)."""
    if tp.size == 1:
        return x
    return fc.all_reduce(x, "sum", tp.group)


def all_gather_columns(x: Tensor, tp: TensorParallel) -> Tensor:
    """Every rank's [T, n] side by side, in rank order: [T, size * n] (vocab-parallel logits)."""
    if tp.size == 1:
        return x
    rows, cols = x.shape
    stacked = fc.wait_tensor(fc.all_gather_single(x.contiguous(), 0, tp.group))  # [size * T, n], rank-major
    return stacked.view(tp.size, rows, cols).transpose(0, 1).reshape(rows, tp.size * cols)
