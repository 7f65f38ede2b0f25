"""The linears with int8 activations (`kiln::linear_w4a8`, `kiln::linear_w8a8`): the C++ kernels against the
torch paths (the same arithmetic), both against the de-quantized weights within the activations' rounding bound,
a row's bits whatever its batch, and the ops inside torch.compile."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.ops.act_int8_linear import (
    W4A8Linear,
    W8A8Linear,
    has_kernel,
    pack_int4,
    pack_int8,
    quantize_rows,
    unpack_int4,
    unpack_int8,
    w4a8_torch,
    w8a8_torch,
)
from kiln.ops.quant_linear import int8_weights

SHAPES = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_kernel = pytest.mark.skipif(not has_kernel(), reason="the C++ kernel needs AVX512-VNNI")


def weights(g: torch.Generator, n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1-like blocks: q in 0..15, d > 0 and m < 0 in float16."""
    q = torch.randint(0, 16, (n_out, n_in), generator=g, dtype=torch.uint8)
    d = (torch.rand(n_out, n_in // 32, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n_out, n_in // 32, generator=g) * 0.15).half().float()
    return q, d, m


def dense(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (q.double().view(q.shape[0], -1, 32) * d.double()[..., None] + m.double()[..., None]).view(q.shape)


@SHAPES
@given(n_out=st.integers(1, 70), blocks=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_pack_then_unpack_gives_the_blocks_back(n_out, blocks, seed):
    q, d, m = weights(torch.Generator().manual_seed(seed), n_out, 32 * blocks)
    w, dm = pack_int4(q, d, m)
    assert w.shape == (-(-n_out // 16), blocks, 4, 64) and dm.dtype == torch.float16
    back = unpack_int4(w, dm, n_out)
    assert torch.equal(back[0], q) and torch.equal(back[1], d) and torch.equal(back[2], m)


@SHAPES
@given(
    rows=st.integers(1, 9), n_out=st.integers(1, 70), blocks=st.integers(1, 20), bias=st.booleans(),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_within_the_activation_rounding_bound_of_the_dequantized_weights(rows, n_out, blocks, bias, dtype, seed):
    """|out - x W^T| <= sum over blocks of (scale / 2) * sum |w| (each input is off by at most half a step),
    plus float32 rounding and the output's own rounding: the layer (the C++ kernel where the CPU has one) and the
    torch path."""
    g = torch.Generator().manual_seed(seed)
    n_in = 32 * blocks
    q, d, m = weights(g, n_out, n_in)
    b = torch.randn(n_out, generator=g) if bias else None
    layer = W4A8Linear(q, d, m, b, dtype)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    w = dense(q, d, m)
    want = x.double() @ w.T + (0 if b is None else b.to(dtype).double())
    _, scales, _ = quantize_rows(x)
    bound = (scales.double()[:, None, :] / 2 * w.abs().view(n_out, blocks, 32).sum(-1)[None]).sum(-1)
    bound += 1e-5 * (x.double().abs() @ w.abs().T) + torch.finfo(dtype).eps * want.abs()
    torch_path = w4a8_torch(x, layer.weights, layer.dm, n_out) + (0 if b is None else layer.bias)
    for got in (layer(x), torch_path):
        assert got.dtype == dtype and got.shape == (rows, n_out)
        assert ((got.double() - want).abs() <= bound + 1e-6).all()


@needs_kernel
@SHAPES
@given(
    rows=st.integers(1, 11), n_out=st.integers(1, 70), blocks=st.integers(1, 20), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_kernel_is_the_torch_paths_arithmetic_and_a_rows_bits_do_not_depend_on_its_batch(rows, n_out, blocks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n_in = 32 * blocks
    layer = W4A8Linear(*weights(g, n_out, n_in), None, dtype)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    got = layer(x)
    want = w4a8_torch(x.float(), layer.weights, layer.dm, n_out)  # float32 out: only the sums' order differs
    torch.testing.assert_close(got.float(), want, atol=1e-4 * blocks**0.5, rtol=torch.finfo(dtype).eps)
    for i in (0, rows - 1):
        assert torch.equal(layer(x[i : i + 1]), got[i : i + 1])
    if rows > 2:
        assert torch.equal(layer(x[1:]), got[1:])


def test_compiled_without_graph_breaks_as_eager():
    g = torch.Generator().manual_seed(0)
    int4 = W4A8Linear(*weights(g, 64, 96), torch.randn(64, generator=g), torch.bfloat16)
    int8, _ = int8_layer(g, 40, 64, True, torch.bfloat16)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    compiled = torch.compile(lambda t: int8(int4(t * 2).relu()), fullgraph=True)
    assert torch.equal(compiled(x), int8(int4(x * 2).relu()))


def test_inputs_of_another_width_are_refused():
    layer = W4A8Linear(*weights(torch.Generator().manual_seed(0), 16, 64), None, torch.float32)
    # The C++ kernel's check (RuntimeError) or the torch path's (ValueError), in the same words.
    with pytest.raises((RuntimeError, ValueError), match=r"int4 x int8 linear of 64 inputs got x of shape \[2, 32\]"):
        layer(torch.randn(2, 32))
    with pytest.raises(ValueError, match="whole groups of 32"):
        pack_int4(torch.zeros(16, 40, dtype=torch.uint8), torch.zeros(16, 1), torch.zeros(16, 1))
    with pytest.raises(ValueError, match="values in -127..127"):
        pack_int8(torch.full((16, 32), -128, dtype=torch.int8), torch.ones(16))


def int8_layer(g: torch.Generator, n_out: int, n_in: int, bias: bool, dtype: torch.dtype) -> tuple[W8A8Linear, torch.Tensor]:
    """A W8A8 layer from random weights, and its de-quantized weight in float64."""
    q, scales = int8_weights(torch.randn(n_out, n_in, generator=g))
    b = torch.randn(n_out, generator=g) if bias else None
    return W8A8Linear(q, scales, b, dtype), q.double() * scales.double()[:, None]


@SHAPES
@given(n_out=st.integers(1, 70), blocks=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_int8_pack_then_unpack_gives_the_weights_back(n_out, blocks, seed):
    q, scales = int8_weights(torch.randn(n_out, 32 * blocks, generator=torch.Generator().manual_seed(seed)))
    w, s = pack_int8(q, scales)
    assert w.shape == (-(-n_out // 16), blocks, 8, 64) and s.shape == (w.shape[0] * 16,)
    assert torch.equal(unpack_int8(w, n_out), q) and torch.equal(s[:n_out], scales)


@SHAPES
@given(
    rows=st.integers(1, 9), n_out=st.integers(1, 70), blocks=st.integers(1, 20), bias=st.booleans(),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_int8_within_the_activation_rounding_bound_of_the_dequantized_weights(rows, n_out, blocks, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    n_in = 32 * blocks
    layer, w = int8_layer(g, n_out, n_in, bias, dtype)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    want = x.double() @ w.T + (0 if layer.bias is None else layer.bias.double())
    _, scales, _ = quantize_rows(x)
    bound = (scales.double()[:, None, :] / 2 * w.abs().view(n_out, blocks, 32).sum(-1)[None]).sum(-1)
    bound += 1e-5 * (x.double().abs() @ w.abs().T) + torch.finfo(dtype).eps * want.abs()
    torch_path = w8a8_torch(x, layer.weights, layer.scales, n_out) + (0 if layer.bias is None else layer.bias)
    for got in (layer(x), torch_path):
        assert got.dtype == dtype and got.shape == (rows, n_out)
        assert ((got.double() - want).abs() <= bound + 1e-6).all()


@needs_kernel
@SHAPES
@given(
    rows=st.integers(1, 11), n_out=st.integers(1, 70), blocks=st.integers(1, 20), dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_int8_kernel_is_the_torch_paths_arithmetic_and_a_rows_bits_do_not_depend_on_its_batch(rows, n_out, blocks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    layer, _ = int8_layer(g, n_out, 32 * blocks, False, dtype)
    x = torch.randn(rows, 32 * blocks, generator=g).to(dtype)
    got = layer(x)
    want = w8a8_torch(x.float(), layer.weights, layer.scales, n_out)
    torch.testing.assert_close(got.float(), want, atol=1e-4 * blocks**0.5, rtol=torch.finfo(dtype).eps)
    for i in (0, rows - 1):
        assert torch.equal(layer(x[i : i + 1]), got[i : i + 1])
    if rows > 2:
        assert torch.equal(layer(x[1:]), got[1:])
