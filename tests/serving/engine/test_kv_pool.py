"""The slot pool hands out freed slots before ones never used."""

from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.serving.engine.kv_pool import KVPool, OutOfSlots


def test_freed_slots_are_reused_first():
    pool = KVPool(num_layers=1, num_slots=16, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"), max_requests=2, max_context=16)
    a = pool.alloc_slots(pool.alloc_row(), 0, 4)
    b = pool.alloc_slots(pool.alloc_row(), 0, 4)
    assert a.tolist() == [1, 2, 3, 4] and b.tolist() == [5, 6, 7, 8]
    pool.free(a)
    again = pool.alloc_slots(0, 0, 6)
    # The four just freed first (still warm in memory), then untouched ones.
    assert again.tolist() == [1, 2, 3, 4, 9, 10]
    assert pool.free_slots == 16 - 4 - 6


def _pool(num_slots: int, max_context: int = 16) -> KVPool:
    return KVPool(num_layers=1, num_slots=num_slots, kv_heads=1, head_dim=1, dtype=torch.float32, device=torch.device("cpu"), max_requests=2, max_context=max_context)


SLOTS = 24


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 8), st.randoms(use_true_random=False)), max_size=60))
def test_matches_a_deque_of_free_slots(ops):
    """The pool hands out exactly what a deque with freed slots pushed on the left would."""
    pool = _pool(SLOTS)
    ref = deque(range(1, SLOTS + 1))
    held: list[list[int]] = []
    for is_alloc, n, rnd in ops:
        if is_alloc:
            if n > len(ref):
                with pytest.raises(OutOfSlots):
                    pool.alloc_slots(0, 0, n)
                continue
            got = pool.alloc_slots(0, 0, n)
            want = [ref.popleft() for _ in range(n)]
            assert got.dtype == torch.int64 and got.tolist() == want
            assert pool.req_to_token[0, :n].tolist() == want
            assert not set(want) & {s for h in held for s in h}, "a slot handed out twice while held"
            held.append(want)
        elif held:
            batch = held.pop(rnd.randrange(len(held)))
            rnd.shuffle(batch)
            pool.free(torch.tensor(batch, dtype=torch.int64))
            ref.extendleft(reversed(batch))
        assert pool.free_slots == len(ref)
    assert sorted(pool._free_slots.tolist() + [s for h in held for s in h]) == list(range(1, SLOTS + 1))


def test_alloc_and_free_do_not_reallocate_the_free_list():
    # Structural stand-in for "no copy of the whole list per call": the backing array stays put.
    pool = _pool(2_000_000, max_context=8)
    ptr = pool._stack.data_ptr()
    for _ in range(1000):
        pool.free(pool.alloc_slots(0, 0, 4))
        assert pool._stack.data_ptr() == ptr
    assert pool.free_slots == pool.size
    assert pool.alloc_slots(0, 0, 3).tolist() == [1, 2, 3]
