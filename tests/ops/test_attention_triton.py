"""The Triton kernels against the reference: under TRITON_INTERPRET=1 on CPU tensors in CI, on CUDA when there is one."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kiln.ops.attention_ref import attention_reference

triton = pytest.importorskip("triton")
from kiln.ops.attention_triton import decode_triton, extend_triton, store_kv_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
HEADS = [(1, 1), (4, 1), (4, 2), (8, 8), (6, 2)]  # (query heads, kv heads): MHA, MQA and GQA
SHAPES = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def on_device(b):
    for name in ("q", "k_new", "v_new", "k_cache", "v_cache", "table", "out_slots", "req_indices", "seq_lens", "extend_lens", "extend_starts"):
        setattr(b, name, getattr(b, name).to(DEVICE))
    return b


def reference(b, causal=True, window=0, cap=0.0):
    k, v = b.stored()
    scale = b.q.shape[-1] ** -0.5
    return attention_reference(b.q, k, v, b.table, b.req_indices, b.seq_lens, b.extend_lens, scale, causal, window, cap).float()


def assert_close(out, ref, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float().cpu(), ref.cpu(), atol=tol, rtol=tol)


@SHAPES
@example(prefixes=[0], heads=(4, 2), head_dim=64, dtype=torch.float32, pad=0, window=0, cap=0.0)  # the first token
@example(prefixes=[130, 0, 7], heads=(8, 8), head_dim=128, dtype=torch.bfloat16, pad=2, window=0, cap=0.0)
@given(
    prefixes=st.lists(st.integers(0, 150), min_size=1, max_size=4),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from(list(TOLERANCE)),
    pad=st.integers(0, 2),
    window=st.sampled_from([0, 0, 5, 40]),
    cap=st.sampled_from([0.0, 0.0, 30.0]),
)
def test_decode(make_batch, prefixes, heads, head_dim, dtype, pad, window, cap):
    b = on_device(make_batch([(p, 1) for p in prefixes], pad=pad, pad_reqs=pad, heads=heads[0], kv_heads=heads[1], head_dim=head_dim, dtype=dtype))
    k, v = (t.to(DEVICE) for t in b.stored())
    out = decode_triton(b.q, k, v, b.table, b.req_indices, b.seq_lens, b.q.shape[-1] ** -0.5, window, cap)
    assert_close(out, reference(b, window=window, cap=cap), dtype)


@SHAPES
@example(reqs=[(0, 1)], heads=(4, 2), head_dim=64, dtype=torch.float32, causal=True, window=0, cap=0.0)
@example(reqs=[(0, 37), (20, 1), (5, 18)], heads=(6, 2), head_dim=128, dtype=torch.float16, causal=True, window=0, cap=0.0)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 60), st.integers(1, 40)), min_size=1, max_size=3),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from(list(TOLERANCE)),
    causal=st.booleans(),
    window=st.sampled_from([0, 0, 7]),
    cap=st.sampled_from([0.0, 0.0, 30.0]),
)
def test_extend(make_batch, reqs, heads, head_dim, dtype, causal, window, cap):
    window = window if causal else 0
    b = on_device(make_batch(reqs, pad=3, pad_reqs=1, heads=heads[0], kv_heads=heads[1], head_dim=head_dim, dtype=dtype))
    k, v = (t.to(DEVICE) for t in b.stored())
    longest = max(n for _, n in reqs)
    out = extend_triton(
        b.q, k, v, b.table, b.req_indices, b.seq_lens, b.extend_lens, b.extend_starts, longest,
        b.q.shape[-1] ** -0.5, causal, window, cap,
    )  # fmt: skip
    assert_close(out, reference(b, causal, window, cap), dtype)
    assert torch.all(out[b.new_rows :] == 0), "padding rows must produce zeros"


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 9), kv_heads=st.sampled_from([1, 2]), head_dim=st.sampled_from([64, 128]), dtype=st.sampled_from(list(TOLERANCE)))
def test_store_kv(rows, kv_heads, head_dim, dtype):
    k = torch.randn(rows, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(rows, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    slots = torch.randperm(20, device=DEVICE)[:rows] + 1
    kc = torch.zeros(21, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    store_kv_triton(k, v, kc, vc, slots)
    assert torch.equal(kc[slots], k) and torch.equal(vc[slots], v)
    untouched = torch.ones(21, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.all(kc[untouched] == 0) and torch.all(vc[untouched] == 0)
