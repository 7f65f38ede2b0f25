"""Which heads, KV heads and vocabulary rows each tensor-parallel rank holds."""

import pytest

from kiln.ops.tensor_parallel import TensorParallel


def ranks(size: int) -> list[TensorParallel]:
    return [TensorParallel(rank, size) for rank in range(size)]


def test_heads_split_in_whole_gqa_groups():
    # SmolLM2-135M: 9 query heads reading 3 KV heads; two ranks hold 1 and 2 groups.
    assert [(r.kv_head_range(3), r.head_range(9, 3)) for r in ranks(2)] == [(range(0, 1), range(0, 3)), (range(1, 3), range(3, 9))]
    assert [r.local_kv_heads(3) for r in ranks(2)] == [1, 2]
    assert [r.local_heads(32, 8) for r in ranks(4)] == [8] * 4


def test_fewer_kv_heads_than_ranks_replicate_the_one_each_rank_reads():
    assert [(r.kv_head_range(2), r.head_range(8, 2)) for r in ranks(4)] == [
        (range(0, 1), range(0, 2)), (range(0, 1), range(2, 4)), (range(1, 2), range(4, 6)), (range(1, 2), range(6, 8)),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="cannot share 3 KV heads"):
        TensorParallel(0, 4).kv_head_range(3)
    with pytest.raises(ValueError, match="6 attention heads do not split over 4"):
        TensorParallel(0, 4).head_range(6, 2)


def test_vocabulary_rows_cover_it_once_with_equal_padded_shards():
    shards = [r.vocab_range(127) for r in ranks(2)]
    assert shards == [range(0, 64), range(64, 127)]
    assert {r.vocab_rows(127) for r in ranks(2)} == {64}


def test_one_rank_holds_everything():
    tp = TensorParallel()
    assert tp.head_range(9, 3) == range(9) and tp.kv_head_range(3) == range(3) and tp.vocab_range(10) == range(10)
