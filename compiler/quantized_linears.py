"""Quantized linears lowered to torch's packed kernels inside a compiled piece.

`kiln::linear_int4` and `kiln::linear_int8` are custom ops with Python bodies: in a compiled piece each call
goes from the C++ dispatcher into Python and back into ATen, about 10 us, 120 times in a batch-1 decode step
of SmolLM2. Once a piece is specialised to a bucket its row count is a number, so the op's choice between the
packed kernel and the float32 copy (`dense_from_rows`) can be made here: a call that takes the packed kernel
becomes that ATen op in the graph, which Inductor calls directly (it has lowerings for both). The kernel is the
one the op runs, so a row's bits do not change.
"""

import operator
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import kiln.ops.quant_linear  # noqa: F401  (defines the two ops)

_INT4 = (torch.ops.kiln.linear_int4, torch.ops.kiln.linear_int4.default)
_INT8 = (torch.ops.kiln.linear_int8, torch.ops.kiln.linear_int8.default)


def _rows(gm: fx.GraphModule, tensors: list[torch.Tensor]) -> dict[fx.Node, int]:
    """Each quantized linear's input row count for these (concrete) inputs: the trace's own values may be
    symbolic."""
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*tensors)
    rows = {n: int(n.args[0].meta["val"].shape[0]) for n in _linears(gm)}
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    return rows


def _linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _INT4 + _INT8]


def _add(gm: fx.GraphModule, op: str, target: Any, args: tuple[Any, ...]) -> fx.Node:
    """A new node with its example value (AOTAutograd's cache checks that each method is called on a tensor,
    which it knows by that value), computed in the fake mode of its inputs' values."""
    node = gm.graph.create_node(op, target, args)
    values = fx.node.map_arg(args, lambda n: n.meta["example_value"])
    fake = next(v for v in values if isinstance(v, FakeTensor))
    with fake.fake_mode:
        node.meta["example_value"] = getattr(values[0], target)(*values[1:]) if op == "call_method" else target(*values)
    return node


def lower_quantized_linears(gm: fx.GraphModule, tensors: list[torch.Tensor]) -> int:
    """Rewrites, in place, each quantized linear of a piece specialised to `tensors` that runs the packed
    kernel for its row count into that kernel's ATen op (plus its bias). Returns how many it rewrote."""
    linears = _linears(gm)
    # A float32 copy is taken from `dense_from_rows` rows; only then does the row count matter.
    rows = _rows(gm, tensors) if any(n.args[-2] is not None for n in linears) else {}
    lowered = 0
    for node in linears:
        if node.args[-2] is not None and rows[node] >= node.args[-1]:
            continue
        with gm.graph.inserting_before(node):
            x = _add(gm, "call_method", "contiguous", (node.args[0],))
            if node.target in _INT4:
                _, packed, scales_zeros, group_size, bias = node.args[:5]
                out = _add(gm, "call_function", torch.ops.aten._weight_int4pack_mm_for_cpu.default, (x, packed, group_size, scales_zeros))
            else:
                _, weight, scales, bias = node.args[:4]
                out = _add(gm, "call_function", torch.ops.aten._weight_int8pack_mm.default, (x, weight, scales))
            if bias is not None:
                out = _add(gm, "call_function", operator.add, (out, bias))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        lowered += 1
    if lowered:
        gm.recompile()
    return lowered
