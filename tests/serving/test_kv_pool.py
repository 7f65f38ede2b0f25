"""The slot pool hands out freed slots before ones never used."""

import torch

from kiln.serving.kv_pool import KVPool


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
