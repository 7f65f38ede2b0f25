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


def assert_within_bound(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, outputs: list[torch.Tensor]) -> None:
    """|out - x W^T| <= sum over blocks of (scale / 2) * sum |w| (each input is off by at most half a step), plus
    float32 rounding and the output's own rounding."""
    want = x.double() @ w.T + (0 if bias is None else bias.double())
    _, scales, _ = quantize_rows(x)
    bound = (scales.double()[:, None, :] / 2 * w.abs().view(w.shape[0], -1, 32).sum(-1)[None]).sum(-1)
    bound += 1e-5 * (x.double().abs() @ w.abs().T) + torch.finfo(x.dtype).eps * want.abs()
    for got in outputs:
        assert got.dtype == x.dtype and got.shape == want.shape
        assert ((got.double() - want).abs() <= bound + 1e-6).all()


def assert_kernel_is(layer: torch.nn.Module, x: torch.Tensor, reference: torch.Tensor) -> None:
    """The kernel against the torch path's float32 output (only the sums' order differs), and a row's bits alone
    or with others."""
    got = layer(x)
    torch.testing.assert_close(got.float(), reference, atol=1e-4 * (x.shape[1] // 32) ** 0.5, rtol=torch.finfo(x.dtype).eps)
    for i in (0, x.shape[0] - 1):
        assert torch.equal(layer(x[i : i + 1]), got[i : i + 1])
    if x.shape[0] > 2:
        assert torch.equal(layer(x[1:]), got[1:])


@SHAPES
@given(n_out=st.integers(1, 70), blocks=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_pack_then_unpack_gives_the_blocks_back(n_out, blocks, seed):
    q, d, m = weights(torch.Generator().manual_seed(seed), n_out, 32 * blocks)
    w, dm = pack_int4(q, d, m)
    assert w.shape == (-(-n_out // 16), blocks, 4, 64) and dm.dtype == torch.float16
    back = unpack_int4(w, dm, n_out)
    assert torch.equal(back[0], q) and torch.equal(back[1], d) and torch.equal(back[2], m)


def layer_of(kind: str, g: torch.Generator, n_out: int, n_in: int, bias: bool, dtype: torch.dtype):
    """(a W4A8 or W8A8 layer from random weights, its de-quantized weight in float64, its torch path)."""
    b = torch.randn(n_out, generator=g) if bias else None
    if kind == "int4":
        q, d, m = weights(g, n_out, n_in)
        layer = W4A8Linear(q, d, m, b, dtype)
        return layer, dense(q, d, m), lambda x: w4a8_torch(x, layer.weights, layer.dm, n_out)
    q, scales = int8_weights(torch.randn(n_out, n_in, generator=g))
    layer = W8A8Linear(q, scales, b, dtype)
    return layer, q.double() * scales.double()[:, None], lambda x: w8a8_torch(x, layer.weights, layer.scales, n_out)


@SHAPES
@given(
    kind=st.sampled_from(["int4", "int8"]), rows=st.integers(1, 9), n_out=st.integers(1, 70), blocks=st.integers(1, 20),
    bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_within_the_activation_rounding_bound_of_the_dequantized_weights(kind, rows, n_out, blocks, bias, dtype, seed):
    """The layer (the C++ kernel where the CPU has one) and the torch path."""
    g = torch.Generator().manual_seed(seed)
    layer, w, torch_path = layer_of(kind, g, n_out, 32 * blocks, bias, dtype)
    x = torch.randn(rows, 32 * blocks, generator=g).to(dtype)
    assert_within_bound(x, w, layer.bias, [layer(x), torch_path(x) + (0 if layer.bias is None else layer.bias)])


@needs_kernel
@SHAPES
@given(
    kind=st.sampled_from(["int4", "int8"]), rows=st.integers(1, 11), n_out=st.integers(1, 70), blocks=st.integers(1, 20),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_kernel_is_the_torch_paths_arithmetic_and_a_rows_bits_do_not_depend_on_its_batch(kind, rows, n_out, blocks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    layer, _, torch_path = layer_of(kind, g, n_out, 32 * blocks, False, dtype)
    x = torch.randn(rows, 32 * blocks, generator=g).to(dtype)
    assert_kernel_is(layer, x, torch_path(x.float()))


def test_compiled_without_graph_breaks_as_eager():
    g = torch.Generator().manual_seed(0)
    int4 = W4A8Linear(*weights(g, 64, 96), torch.randn(64, generator=g), torch.bfloat16)
    int8, _, _ = layer_of("int8", g, 40, 64, True, torch.bfloat16)
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


@SHAPES
@given(n_out=st.integers(1, 70), blocks=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_int8_pack_then_unpack_gives_the_weights_back(n_out, blocks, seed):
    q, scales = int8_weights(torch.randn(n_out, 32 * blocks, generator=torch.Generator().manual_seed(seed)))
    w, s = pack_int8(q, scales)
    assert w.shape == (-(-n_out // 16), blocks, 8, 64) and s.shape == (w.shape[0] * 16,)
    assert torch.equal(unpack_int8(w, n_out), q) and torch.equal(s[:n_out], scales)
