"""int8 and int4 weight-only linears against their own de-quantized weights, eager and inside torch.compile,
on the packed kernels and on their float32 copies (`dense_from_rows`)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.ops.quant_linear import Int4Linear, Int8Linear, int4_weights, int8_weights

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SHAPES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ weight.t()
    return out if bias is None else out + bias.float()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, fan_in: int) -> None:
    tol = TOLERANCE[dtype] * fan_in**0.5  # rounding grows with the length of each dot product
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=TOLERANCE[dtype])


@SHAPES
@given(
    rows=st.integers(1, 40), sixteens=st.integers(1, 12), n_out=st.integers(1, 120), bias=st.booleans(),
    dtype=st.sampled_from(list(TOLERANCE)), dense_from_rows=st.sampled_from([0, 1, 8, 32]), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_int8_matches_its_dequantized_weights(rows, sixteens, n_out, bias, dtype, dense_from_rows, seed):
    g = torch.Generator().manual_seed(seed)
    n_in = 16 * sixteens
    w, b = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g) if bias else None
    q, scales = int8_weights(w)
    assert (w - q.float() * scales[:, None]).abs().max() <= scales.max() / 2 + 1e-6  # round to nearest
    layer = Int8Linear(q, scales, b, dtype, dense_from_rows)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    deq = q.float() * scales.to(dtype).float()[:, None]
    if dense_from_rows:
        assert torch.equal(layer.dense, deq)
    assert_close(layer(x), reference(x, deq, None if b is None else b.to(dtype)), dtype, n_in)


@SHAPES
@given(
    rows=st.integers(1, 40), groups=st.integers(1, 4), group=st.sampled_from([32, 64, 128]), sixteens=st.integers(1, 5),
    bias=st.booleans(), dtype=st.sampled_from(list(TOLERANCE)), dense_from_rows=st.sampled_from([0, 1, 8, 32]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_int4_matches_its_dequantized_weights(rows, groups, group, sixteens, bias, dtype, dense_from_rows, seed):
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = groups * group, 16 * sixteens
    w, b = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g) if bias else None
    q, scale, zero = int4_weights(w, group)
    assert q.max() <= 15
    expand = lambda t: t.float().repeat_interleave(group, dim=1)  # noqa: E731
    assert (w - ((q.float() - 8) * expand(scale) + expand(zero))).abs().max() <= scale.max() / 2 + 1e-5  # within half a step
    # The kernel holds scales and zeros in the activations' dtype.
    deq = (q.float() - 8) * expand(scale.to(dtype)) + expand(zero.to(dtype))
    layer = Int4Linear(q, scale, zero, b, dtype, dense_from_rows)
    if dense_from_rows:
        assert torch.equal(layer.dense, deq)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    assert_close(layer(x), reference(x, deq, None if b is None else b.to(dtype)), dtype, n_in)


def test_int4_from_packed_buffers_is_the_same_layer():
    """What the Q4_1 cache rebuilds layers with: another layer's buffers, and q for the float32 copy."""
    g = torch.Generator().manual_seed(0)
    q, scale, zero = int4_weights(torch.randn(48, 128, generator=g), 32)
    bias = torch.randn(48, generator=g)
    made = Int4Linear(q, scale, zero, bias, torch.bfloat16, dense_from_rows=8)
    again = Int4Linear.from_packed(made.packed, made.scales_zeros, 128, bias, dense_from_rows=8, q=q)
    assert (again.out_features, again.in_features, again.group_size) == (48, 128, 32)
    assert all(torch.equal(a, b) for a, b in zip(made.state_dict().values(), again.state_dict().values(), strict=True))
    for rows in (2, 8):  # packed kernel, float32 copy
        x = torch.randn(rows, 128, generator=g).bfloat16()
        assert torch.equal(again(x), made(x))
    with pytest.raises(ValueError, match="rebuilt from q"):
        Int4Linear.from_packed(made.packed, made.scales_zeros, 128, bias, dense_from_rows=8)


def test_compiled_across_row_counts_without_recompiles():
    """Row counts on both sides of the float32 copies' threshold share one graph."""
    g = torch.Generator().manual_seed(0)
    w8, w4 = torch.randn(64, 96, generator=g), torch.randn(32, 64, generator=g)
    int8 = Int8Linear(*int8_weights(w8), torch.randn(64, generator=g), torch.bfloat16, dense_from_rows=32)
    int4 = Int4Linear(*int4_weights(w4, 32), None, torch.bfloat16, dense_from_rows=32)

    def block(x: torch.Tensor) -> torch.Tensor:
        return int4(torch.relu(int8(x)))

    compiled = torch.compile(block, dynamic=True, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for rows in (2, 7, 33, 64):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        torch.testing.assert_close(compiled(x), block(x), atol=2e-2, rtol=2e-2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
