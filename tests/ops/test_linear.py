"""kiln's linear (oneDNN on the CPU for float32) against F.linear, eager and inside a compiled graph."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.ops.linear import Linear, linear


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 70), n_in=st.integers(1, 300), n_out=st.integers(1, 300), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_f_linear(rows, n_in, n_out, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    b = torch.randn(n_out, generator=g) if bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_non_contiguous_input_and_other_dtypes():
    w = torch.randn(24, 16)
    x = torch.randn(16, 10).t()  # [10, 16], column-major
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(linear(xb, wb), F.linear(xb, wb))


def test_module_keeps_nn_linear_names_and_runs_compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = Linear(32, 48)
    assert set(dict(layer.named_parameters())) == {"weight", "bias"}
    fn = torch.compile(lambda x: torch.relu(layer(x)) * 2, fullgraph=True, dynamic=True)
    for rows in (3, 5):
        x = torch.randn(rows, 32)
        with torch.inference_mode():  # as the engine runs: the op has no autograd formula
            torch.testing.assert_close(fn(x), torch.relu(F.linear(x, layer.weight, layer.bias)) * 2, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["graph_break"].total() == 0


@pytest.mark.parametrize("rows", [1, 2, 33])
def test_large_output_like_an_lm_head(rows):
    x, w = torch.randn(rows, 576), torch.randn(4099, 576)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-3)
