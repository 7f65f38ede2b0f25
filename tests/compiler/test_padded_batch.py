"""A bucket's own input buffers: each batch copied in, every row past it zero (padding), reused step after step."""

import torch

from kiln.compiler.compiled_model import PaddedBatch
from kiln.ops.attention import AttentionMetadata


def _batch(ids: list[int], lens: list[int], ext: list[int], table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    as_t = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
    return as_t(ids), as_t([i + 100 for i in ids]), AttentionMetadata.build(as_t([i + 200 for i in ids]), table, range(len(lens)), lens, ext)


def _rows(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> list[list[int]]:
    return [t.tolist() for t in (ids, positions, meta.out_slots, meta.req_indices, meta.seq_lens, meta.extend_lens, meta.extend_starts)]


def test_batches_of_one_bucket_share_its_buffers_and_pad_with_zeros():
    table = torch.zeros(4, 16, dtype=torch.int32)
    padded = PaddedBatch(6, table)
    first = padded.fill(*_batch([1, 2, 3, 4, 5], [3, 2], [3, 2], table))
    assert _rows(*first) == [
        [1, 2, 3, 4, 5, 0], [101, 102, 103, 104, 105, 0], [201, 202, 203, 204, 205, 0],
        [0, 1, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [0, 3, 0, 0, 0, 0],
    ]  # fmt: skip
    assert first[2].max_extend_len.tolist() == [3] and first[2].req_to_token is table
    second = padded.fill(*_batch([7, 8, 9], [4, 5, 6], [1, 1, 1], table))  # fewer tokens, more requests
    assert _rows(*second) == [
        [7, 8, 9, 0, 0, 0], [107, 108, 109, 0, 0, 0], [207, 208, 209, 0, 0, 0],
        [0, 1, 2, 0, 0, 0], [4, 5, 6, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 2, 0, 0, 0],
    ]  # fmt: skip
    assert second[2].max_extend_len.tolist() == [1]
    full = padded.fill(*_batch([1, 2, 3, 4, 5, 6], [9] * 6, [1] * 6, table))  # a full bucket, then a smaller batch
    assert _rows(*full)[0] == [1, 2, 3, 4, 5, 6] and _rows(*full)[6] == [0, 1, 2, 3, 4, 5]
    last = padded.fill(*_batch([7], [3], [1], table))
    assert _rows(*last) == [[7, 0, 0, 0, 0, 0], [107, 0, 0, 0, 0, 0], [207, 0, 0, 0, 0, 0], [0] * 6, [3, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6]
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(_tensors(first), _tensors(last)))


def _tensors(padded: tuple[torch.Tensor, torch.Tensor, AttentionMetadata]) -> list[torch.Tensor]:
    ids, positions, meta = padded
    return [ids, positions, meta.out_slots, meta.req_indices, meta.seq_lens, meta.extend_lens, meta.extend_starts]
