"""kiln::attention (the CPU path) against the reference, on ragged mixed batches with padding."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.ops.attention import AttentionMetadata, attention, attention_op
from kiln.ops.attention_ref import attention_reference
from kiln.ops.attention_torch import extend_torch


def run_op(b, causal=True, sliding_window=0, logit_cap=0.0, inplace_decode=False):
    meta = AttentionMetadata(
        b.out_slots, b.table, b.req_indices, b.seq_lens, b.extend_lens, b.extend_starts,
        torch.tensor([int(b.extend_lens.max())]),
    )  # fmt: skip
    scale = b.q.shape[-1] ** -0.5
    if inplace_decode:  # what the compiler sets in a compiled model's graph
        out = attention_op(
            b.q, b.k_new, b.v_new, b.k_cache, b.v_cache, b.layer, meta.out_slots, meta.req_to_token, meta.req_indices,
            meta.seq_lens, meta.extend_lens, meta.extend_starts, meta.max_extend_len, scale, causal, sliding_window, logit_cap,
            inplace_decode=True,
        )  # fmt: skip
    else:
        out = attention(b.q, b.k_new, b.v_new, (b.k_cache, b.v_cache), b.layer, meta, scale, causal, sliding_window, logit_cap)
    k, v = b.stored()
    ref = attention_reference(b.q, k, v, b.table, b.req_indices, b.seq_lens, b.extend_lens, scale, causal, sliding_window, logit_cap)
    return out, ref


reqs_st = st.lists(st.tuples(st.integers(0, 12), st.integers(1, 9)), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@example(reqs=[(3, 1), (0, 1), (5, 1)], pad=2, pad_reqs=2, group=3, head_dim=8)  # a padded decode bucket
@example(reqs=[(3, 1), (6, 1)], pad=0, pad_reqs=0, group=1, head_dim=16)  # plain decode
@given(reqs=reqs_st, pad=st.integers(0, 3), pad_reqs=st.integers(0, 2), group=st.sampled_from([1, 3]), head_dim=st.sampled_from([8, 16]))
def test_matches_reference(make_batch, reqs, pad, pad_reqs, group, head_dim):
    if all(n == 1 for _, n in reqs):
        pad = pad_reqs  # a decode bucket pads rows and requests together
    b = make_batch(reqs, pad, pad_reqs, heads=2 * group, kv_heads=2, head_dim=head_dim)
    out, ref = run_op(b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[b.new_rows :] == 0), "padding rows must produce zeros"
    # New K/V landed in their slots; the other layer was untouched.
    torch.testing.assert_close(b.k_cache[b.layer, b.out_slots[: b.new_rows]], b.k_new[: b.new_rows])
    assert torch.all(b.k_cache[0] == 0)


@settings(max_examples=15, deadline=None)
@given(reqs=reqs_st, window=st.integers(1, 6), cap=st.sampled_from([0.0, 5.0]), causal=st.booleans())
def test_window_softcap_and_bidirectional(make_batch, reqs, window, cap, causal):
    b = make_batch(reqs, pad=1)
    out, ref = run_op(b, causal=causal, sliding_window=window if causal else 0, logit_cap=cap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@example(reqs=[(700, 1)], pad=0, window=0, cap=0.0, dtype=torch.bfloat16)  # one request: the other compiled variant
@given(
    reqs=st.lists(st.tuples(st.integers(0, 40), st.just(1)), min_size=1, max_size=5),
    pad=st.integers(0, 2),
    window=st.sampled_from([0, 3, 30]),
    cap=st.sampled_from([0.0, 5.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_inplace_decode_matches_reference(make_batch, reqs, pad, window, cap, dtype):
    """Inductor's kernel over the pool (compiled models on the CPU), with padding requests, windows and caps."""
    b = make_batch(reqs, pad, pad, heads=6, kv_heads=2, head_dim=16, dtype=dtype)
    out, ref = run_op(b, sliding_window=window, logit_cap=cap, inplace_decode=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    assert torch.all(out[b.new_rows :] == 0), "padding requests must produce zeros"


def test_bfloat16_close_to_reference(make_batch):
    b = make_batch([(20, 7), (0, 1), (33, 1)], dtype=torch.bfloat16)
    out, ref = run_op(b)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_fake_impls_keep_shapes_under_compile_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(5, 4, 8)
        k = torch.empty(5, 2, 8)
        cache = torch.empty(1, 10, 2, 8)
        idx = torch.zeros(5, dtype=torch.int64)
        table = torch.zeros(2, 8, dtype=torch.int32)
        ops = torch.ops.kiln
        outs = [
            ops.attention(q, k, k, cache, cache, 0, idx, table, idx[:1], idx[:1], idx[:1], idx[:1], idx[:1], 1.0, True, 0, 0.0),
            ops.decode_attention(q, cache, cache, 0, table, idx, idx, 1.0, 0, 0.0),
            ops.extend_attention(q, cache, cache, 0, table, idx[:1], idx[:1], idx[:1], idx[:1], 5, 1.0, True, 0, 0.0),
        ]
        ops.store_kv(k, k, cache, cache, 0, idx)
    assert [tuple(o.shape) for o in outs] == [(5, 4, 8)] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 200])
def test_a_prompt_position_comes_out_the_same_however_its_prefix_was_computed(dtype, window):
    """What keeps prompt logprobs and /v1/score independent of the radix cache: a prompt position's output
    has the same bits whether the prompt runs whole, over a cached prefix of any length (two or more new
    tokens), or as part of a shorter prompt; 700 tokens cross SDPA's 512-key split."""
    torch.manual_seed(0)
    total, heads, kv_heads, dim = 700, 6, 2, 16
    k_cache, v_cache = (torch.randn(total + 1, kv_heads, dim).to(dtype) for _ in range(2))
    table = torch.arange(1, total + 1, dtype=torch.int32)[None]
    q = torch.randn(total, heads, dim).to(dtype)

    def attend(length: int, new: int) -> torch.Tensor:
        lens = lambda n: torch.tensor([n])  # noqa: E731
        return extend_torch(q[length - new : length], k_cache, v_cache, table, lens(0), lens(length), lens(new), 0.25, True, window, 0.0)

    whole = attend(total, total)
    for cached in (1, 37, 511, 513, 650, total - 2):
        assert torch.equal(attend(total, total - cached), whole[cached:]), f"cached prefix of {cached}"
    for shorter in (2, 100, 530, 690):
        assert torch.equal(attend(shorter, shorter), whole[:shorter]), f"a prompt of {shorter}"


def _ops_called(fn):
    """fn()'s result and the kiln ops it dispatched, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, [e.name for e in prof.events() if e.name.startswith("kiln::")]


def test_a_built_decode_step_runs_in_cpp_and_everything_else_in_python(make_batch):
    """Once the in-place kernel is built, decode steps never enter the op's Python kernel (kiln::attention_py);
    prefill, eager calls and calls the kernel cannot read still do, with the same results and errors."""
    decode = dict(pad=1, pad_reqs=1, heads=6, kv_heads=2, head_dim=16)
    run_op(make_batch([(5, 1), (9, 1)], **decode), inplace_decode=True)  # builds and registers the variant
    b = make_batch([(3, 1), (11, 1)], **decode)
    (out, ref), ops = _ops_called(lambda: run_op(b, inplace_decode=True))
    assert ops == ["kiln::attention"]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[b.new_rows :] == 0)
    torch.testing.assert_close(b.k_cache[b.layer, b.out_slots[: b.new_rows]], b.k_new[: b.new_rows])

    for reqs, inplace in (([(3, 4), (2, 1)], True), ([(3, 1), (11, 1)], False)):  # prefill; an eager model's decode
        b = make_batch(reqs, **decode)
        (out, ref), ops = _ops_called(lambda: run_op(b, inplace_decode=inplace))
        assert "kiln::attention_py" in ops
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    b = make_batch([(3, 1), (11, 1)], **decode)
    b.table = b.table.long()  # a layout the kernel cannot read: the Python kernel's error, not a wrong answer
    with pytest.raises(ValueError, match="int32 slot table"):
        run_op(b, inplace_decode=True)
