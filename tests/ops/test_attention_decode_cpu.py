"""The CPU decode kernel over the slot pool (compiled models) against the reference, request by request."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.ops.attention_decode_cpu import decode_inplace
from kiln.ops.attention_ref import attention_reference

# (query heads per KV head, KV heads, head dim, dtype): a head dim under one vector, one with a partial last
# vector, SmolLM2's shape; the three dtypes; each is one kernel build, kept few.
SHAPES = [(3, 2, 16, torch.float32), (3, 2, 16, torch.bfloat16), (1, 1, 8, torch.float32), (4, 2, 24, torch.float16), (3, 3, 64, torch.bfloat16)]


def pool_batch(lens: list[int], group: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    """Requests of `lens` tokens (0: a padding request) in scattered slots of a pool whose other slots hold
    NaN, as freed or never-written slots may; the slot table's tail past each length points at them."""
    g = torch.Generator().manual_seed(seed)
    slots = sum(lens) + 4
    k_cache = torch.full((slots, kv_heads, dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    width = max(lens) + 3
    free = torch.randperm(slots, generator=g).tolist()
    table = torch.full((len(lens) + 2, width), free.pop(), dtype=torch.int32)
    rows = torch.randperm(len(lens) + 2, generator=g)[: len(lens)]
    for row, n in zip(rows.tolist(), lens):
        mine = [free.pop() for _ in range(n)]
        table[row, :n] = torch.tensor(mine, dtype=torch.int32)
        k_cache[mine] = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
        v_cache[mine] = torch.randn(n, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(len(lens), group * kv_heads, dim, generator=g).to(dtype)
    return q, k_cache, v_cache, table, rows, torch.tensor(lens)


def reference(q, k_cache, v_cache, table, rows, lens, scale, window, cap):
    out = torch.zeros(q.shape)
    for b in range(q.shape[0]):
        if lens[b] > 0:
            one = torch.ones(1, dtype=torch.int64)
            out[b] = attention_reference(q[b : b + 1], k_cache, v_cache, table, rows[b : b + 1], lens[b : b + 1], one, scale, True, window, cap)[0]
    return out


@settings(max_examples=30, deadline=None)
@example(lens=[300], shape=SHAPES[4], window=0, cap=0.0, threads=2)  # one long request: its context split in chunks
@example(lens=[0, 5, 0], shape=SHAPES[0], window=0, cap=0.0, threads=1)  # padding requests around a real one
@given(
    lens=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    shape=st.sampled_from(SHAPES),
    window=st.sampled_from([0, 1, 7, 100]),
    cap=st.sampled_from([0.0, 5.0]),
    threads=st.sampled_from([1, 2]),
)
def test_matches_reference_and_never_reads_past_a_request(lens, shape, window, cap, threads):
    group, kv_heads, dim, dtype = shape
    q, k_cache, v_cache, table, rows, seq_lens = pool_batch(lens, group, kv_heads, dim, dtype)
    scale = dim**-0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # how many chunks a request's context is split into follows the threads
    try:
        out = decode_inplace(q, k_cache, v_cache, table, rows, seq_lens, scale, window, cap)
    finally:
        torch.set_num_threads(before)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), reference(q, k_cache, v_cache, table, rows, seq_lens, scale, window, cap), atol=tol, rtol=tol)
    assert torch.all(out[seq_lens == 0] == 0), "padding requests must produce zeros"


def test_a_long_window_over_a_long_context_splits_into_many_chunks():
    """One request, one KV head, one thread: 4 chunks; the window starts mid-chunk."""
    q, k_cache, v_cache, table, rows, seq_lens = pool_batch([1000], 1, 1, 8, torch.float32, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = decode_inplace(q, k_cache, v_cache, table, rows, seq_lens, 0.3, 613, 0.0)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, table, rows, seq_lens, 0.3, 613, 0.0), atol=1e-5, rtol=1e-5)


def test_an_int64_slot_table_is_refused_with_a_clear_error():
    q, k_cache, v_cache, table, rows, seq_lens = pool_batch([3], 3, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="int32 slot table"):
        decode_inplace(q, k_cache, v_cache, table.long(), rows, seq_lens, 0.25, 0, 0.0)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[4]])
def test_the_kernel_stores_the_step_k_v_as_a_separate_store_would(shape):
    """The step's K/V (views of a wider projection, as in a model) stored by the kernel before it attends:
    the same pool and the same output as index_copy_ first. Padding requests write a slot no request reads."""
    from kiln.ops.attention_torch import store_kv_torch

    group, kv_heads, dim, dtype = shape
    lens = [0, 40, 7, 0, 300]
    q, k_cache, v_cache, table, rows, seq_lens = pool_batch(lens, group, kv_heads, dim, dtype, seed=2)
    newest = [int(table[r, n - 1]) for r, n in zip(rows.tolist(), lens) if n]
    slots = torch.tensor([int(table[r, n - 1]) if n else int(table[r, -1]) for r, n in zip(rows.tolist(), lens)])
    wide = torch.randn(len(lens), 2 * kv_heads, dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    k, v = wide[:, :kv_heads], wide[:, kv_heads:]
    k_want, v_want = k_cache.clone(), v_cache.clone()
    store_kv_torch(k, v, k_want, v_want, slots)
    want = decode_inplace(q, k_want, v_want, table, rows, seq_lens, dim**-0.5, 0, 0.0)
    out = decode_inplace(q, k_cache, v_cache, table, rows, seq_lens, dim**-0.5, 0, 0.0, (k, v, slots))
    assert torch.equal(out, want)
    assert torch.equal(k_cache[newest], k_want[newest]) and torch.equal(v_cache[newest], v_want[newest])
    torch.testing.assert_close(k_cache, k_want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_want, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="one per request"):
        decode_inplace(q, k_cache, v_cache, table, rows, seq_lens, dim**-0.5, 0, 0.0, (k[:-1], v[:-1], slots[:-1]))
