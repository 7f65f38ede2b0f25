"""`kiln::moe` on the CPU against the readable reference, eager and inside torch.compile."""

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kiln.ops.moe import moe
from kiln.ops.moe_ref import moe_reference
from kiln.ops.moe_routing import route

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def layer(tokens: int, hidden: int, inter: int, experts: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return randn(tokens, hidden), randn(tokens, experts), randn(experts, 2 * inter, hidden) / hidden**0.5, randn(experts, hidden, inter) / inter**0.5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(tokens=1, real=1, hidden=64, inter=32, experts=8, top_k=2, renormalize=False, dtype=torch.float32)  # decode
@example(tokens=9, real=0, hidden=32, inter=16, experts=4, top_k=4, renormalize=True, dtype=torch.float32)  # all padding
@given(
    tokens=st.integers(1, 48),
    real=st.integers(0, 48),
    hidden=st.sampled_from([32, 64, 72]),
    inter=st.sampled_from([16, 40]),
    experts=st.sampled_from([4, 8, 16]),
    top_k=st.sampled_from([1, 2, 4]),
    renormalize=st.booleans(),
    dtype=st.sampled_from(list(TOLERANCE)),
)
def test_matches_reference_on_real_rows_and_counts_them(tokens, real, hidden, inter, experts, top_k, renormalize, dtype):
    real = min(real, tokens)
    x, logits, w13, w2 = layer(tokens, hidden, inter, experts, dtype)
    counts = torch.arange(experts, dtype=torch.int64)  # adds into what is there
    out = moe(x, logits, w13, w2, top_k, renormalize, torch.tensor(real), counts)
    tol = TOLERANCE[dtype]
    ref = moe_reference(x[:real], logits[:real], w13, w2, top_k, renormalize)
    torch.testing.assert_close(out[:real].float(), ref.float(), atol=tol, rtol=tol)
    assert not out[real:].any()
    chosen = route(logits[:real], top_k, renormalize)[1]
    assert torch.equal(counts - torch.arange(experts), torch.bincount(chosen.flatten(), minlength=experts))


def test_compiled_across_batch_sizes_without_recompiles():
    _, _, w13, w2 = layer(1, 64, 32, 8, torch.float32)
    counts = torch.zeros(8, dtype=torch.int64)

    def block(x: torch.Tensor, router: torch.Tensor, extend_lens: torch.Tensor) -> torch.Tensor:
        return x + moe(torch.nn.functional.rms_norm(x, (64,)), x @ router, w13, w2, 2, True, extend_lens.sum(), counts)

    router = torch.randn(64, 8)
    compiled = torch.compile(block, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    total = torch.zeros(8, dtype=torch.int64)
    for tokens, lens in [(4, [1, 1, 1]), (16, [9, 4]), (33, [30, 3]), (7, [0, 0])]:
        x = torch.randn(tokens, 64)
        want = x + moe_reference(torch.nn.functional.rms_norm(x, (64,)), x @ router, w13, w2, 2, True)
        real = sum(lens)
        got = compiled(x, router, torch.tensor(lens))
        torch.testing.assert_close(got[:real], want[:real], atol=1e-5, rtol=1e-5)
        total += torch.bincount(route(x[:real] @ router, 2, True)[1].flatten(), minlength=8)
    assert torch.equal(counts, total)  # the in-place add survives compilation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
