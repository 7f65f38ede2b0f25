"""Quantized linears lowered to torch's packed kernels in a specialised piece: the same bits as the ops, and the
float32 copies kept where the bucket's row count takes them."""

import pytest
import torch

from kiln.compiler.quantized_linears import lower_quantized_linears
from kiln.ops.quant_linear import Int4Linear, Int8Linear, int4_weights, int8_weights


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.int8 = Int8Linear(*int8_weights(torch.randn(64, 96, generator=g)), None, torch.bfloat16)
        self.int4 = Int4Linear(*int4_weights(torch.randn(32, 64, generator=g), 32), torch.randn(32, generator=g), torch.bfloat16, dense_from_rows=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.int4(torch.relu(self.int8(x)))


def traced(block: Block, x: torch.Tensor) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """Dynamo's graph of the block for x's shape, and its inputs (the weights among them)."""
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]):
        graphs.append((gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(block, backend=backend, fullgraph=True, dynamic=False)(x)
    return graphs[0]


def targets(gm: torch.fx.GraphModule) -> set[str]:
    """The ops a graph calls (Dynamo records an op by its packet, the lowering by its overload)."""
    return {str(n.target).removesuffix(".default") for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("rows, lowered", [(3, 2), (40, 1)])
def test_lowered_linears_give_the_ops_bits(rows, lowered):
    block = Block()
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = block(x)
    gm, inputs = traced(block, x)
    assert lower_quantized_linears(gm, inputs) == lowered
    ops = targets(gm)
    assert "aten._weight_int8pack_mm" in ops and "kiln.linear_int8" not in ops
    # Under 32 rows the int4 layer runs its packed kernel; from 32 its float32 copy, which stays the op's choice.
    assert ("aten._weight_int4pack_mm_for_cpu" in ops) == (rows < 32)
    assert ("kiln.linear_int4" in ops) == (rows >= 32)
    assert torch.equal(gm(*inputs)[0], want)
    compiled = torch._inductor.compile(gm, inputs)
    assert torch.equal(compiled(*inputs)[0], want)
