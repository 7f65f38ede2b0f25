"""The Triton MoE kernel against the reference: under TRITON_INTERPRET=1 on CPU tensors in CI, on CUDA when there is one."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kiln.ops.moe_ref import moe_reference
from kiln.ops.moe_routing import route

triton = pytest.importorskip("triton")
from kiln.ops.moe_triton import _align, moe_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def problem(tokens, experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) * inter**-0.5
    return [t.to(DEVICE, dtype) for t in (x, logits, w13, w2)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(tokens=1, real=1.0, experts=8, top_k=2, hidden=64, inter=16, renormalize=True, dtype=torch.float32, seed=0)  # decode
@example(tokens=40, real=0.9, experts=4, top_k=4, hidden=96, inter=48, renormalize=False, dtype=torch.bfloat16, seed=1)  # BLOCK_M 64
@example(tokens=5, real=0.0, experts=16, top_k=1, hidden=32, inter=16, renormalize=True, dtype=torch.float16, seed=2)  # all padding
@given(
    tokens=st.integers(1, 40),
    real=st.floats(0.0, 1.0),
    experts=st.sampled_from([4, 8, 16]),
    top_k=st.sampled_from([1, 2, 4]),
    hidden=st.sampled_from([32, 64, 96]),
    inter=st.sampled_from([16, 48]),
    renormalize=st.booleans(),
    dtype=st.sampled_from(list(TOLERANCE)),
    seed=st.integers(0, 2**16),
)
def test_moe(tokens, real, experts, top_k, hidden, inter, renormalize, dtype, seed):
    n = round(real * tokens)
    x, logits, w13, w2 = problem(tokens, experts, hidden, inter, dtype, seed)
    counts = torch.arange(experts, device=DEVICE)  # the op adds to what is there
    out = moe_triton(x, logits, w13, w2, top_k, renormalize, torch.tensor(n, device=DEVICE), counts)

    assert out.shape == x.shape and out.dtype == dtype
    ref = moe_reference(x[:n].cpu(), logits[:n].cpu(), w13.cpu(), w2.cpu(), top_k, renormalize).float()
    tol = TOLERANCE[dtype]
    scale = max(ref.abs().max().item(), 1.0) if n else 1.0
    torch.testing.assert_close(out[:n].float().cpu(), ref, atol=tol * scale, rtol=tol)
    assert torch.all(out[n:] == 0), "padding rows must produce zeros"
    routed = torch.bincount(route(logits[:n], top_k, renormalize)[1].flatten().cpu(), minlength=experts)
    assert torch.equal(counts.cpu(), torch.arange(experts) + routed), "counts real rows only, and accumulates"


def test_counts_accumulate():
    x, logits, w13, w2 = problem(9, 8, 32, 16, torch.float32)
    counts = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    n = torch.tensor([6], device=DEVICE)  # a [1] tensor, as well as 0-d
    first = moe_triton(x, logits, w13, w2, 2, True, n, counts)
    once = counts.clone()
    second = moe_triton(x, logits, w13, w2, 2, True, n, counts)
    assert torch.equal(first, second)
    assert once.sum() == 12 and torch.equal(counts, 2 * once)


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_shapes_do_not_depend_on_routing(block_m):
    """The CPU-checkable half of graph capture: the align step runs on meta tensors (so reads no value
    on the host), and on real ones every routing gives the same shapes and a well-formed layout."""
    tokens, top_k, experts = 13, 2, 8
    ids, n = torch.empty(tokens, top_k, dtype=torch.int64, device="meta"), torch.empty((), dtype=torch.int64, device="meta")
    meta = _align(ids, n, experts, block_m)
    slots = tokens * top_k + experts * (block_m - 1)
    assert [t.shape for t in meta] == [(slots,), (triton.cdiv(slots, block_m),), (experts,)]

    g = torch.Generator().manual_seed(0)
    skewed = torch.zeros(tokens, top_k, dtype=torch.int64)  # every pair on expert 0, then expert 1
    skewed[:, 1] = 1
    for ids, n in [(skewed, tokens), (torch.rand(tokens, experts, generator=g).argsort(1)[:, :top_k], 7), (skewed, 0)]:
        sorted_pairs, block_expert, counts = _align(ids, torch.tensor(n), experts, block_m)
        assert [t.shape for t in (sorted_pairs, block_expert, counts)] == [t.shape for t in meta]
        flat = ids.flatten()
        real = sorted_pairs[sorted_pairs < tokens * top_k]
        assert sorted(real.tolist()) == list(range(n * top_k)), "each real pair once, no padding pair"
        assert torch.equal(counts, torch.bincount(flat[: n * top_k], minlength=experts))
        for block, expert in enumerate(block_expert.tolist()):
            pairs = sorted_pairs[block * block_m : (block + 1) * block_m]
            pairs = pairs[pairs < tokens * top_k]
            assert expert >= 0 or len(pairs) == 0
            assert torch.all(flat[pairs] == expert), "one expert per block"


@pytest.mark.gpu
def test_cuda_graph_capture():
    """No host sync: the op captures, and replays on new routing and a new num_tokens."""
    x, logits, w13, w2 = problem(24, 8, 64, 48, torch.bfloat16)
    n = torch.tensor(24, device=DEVICE)
    counts = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    moe_triton(x, logits, w13, w2, 2, True, n, counts)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_triton(x, logits, w13, w2, 2, True, n, counts)
    x2, logits2, _, _ = problem(24, 8, 64, 48, torch.bfloat16, seed=1)
    x.copy_(x2), logits.copy_(logits2), n.fill_(17), counts.zero_()
    graph.replay()
    expected_counts = torch.zeros_like(counts)
    expected = moe_triton(x, logits, w13, w2, 2, True, n, expected_counts)
    assert torch.equal(out, expected) and torch.equal(counts, expected_counts)
    assert torch.all(out[17:] == 0)
