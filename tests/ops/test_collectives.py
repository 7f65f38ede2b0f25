"""The functional collectives the tensor-parallel models use compile into a graph without a break, over gloo on
the CPU and over NCCL on a GPU (one rank: the most one device can check)."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_all_reduce_and_all_gather_compile_into_one_graph(backend, tmp_path):
    device = "cuda" if backend == "nccl" else "cpu"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", world_size=1, rank=0)
    try:
        group = dist.group.WORLD

        def step(x: torch.Tensor) -> torch.Tensor:
            reduced = fc.all_reduce(x * 2, "sum", group)
            return fc.wait_tensor(fc.all_gather_single(reduced + 1, 0, group))

        torch._dynamo.reset()
        x = torch.arange(12, dtype=torch.float32, device=device).view(3, 4)
        out = torch.compile(step, fullgraph=True)(x)
        assert torch.equal(out, x * 2 + 1)
        assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    finally:
        dist.destroy_process_group()
