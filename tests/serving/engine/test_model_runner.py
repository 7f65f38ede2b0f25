"""The model runner's step tensors: one packed host tensor, the output slots gathered from the slot table."""

import torch

from kiln.ops.attention import AttentionMetadata
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.model_runner import ModelRunner
from kiln.serving.engine.request import Req
from kiln.serving.engine.scheduler import Scheduler
from kiln.serving.sampling_params import SamplingParams


def _fields(meta: AttentionMetadata) -> list[list[int]]:
    return [t.tolist() for t in (meta.out_slots, meta.req_indices, meta.seq_lens, meta.extend_lens, meta.extend_starts, meta.max_extend_len)]


def _step(prompts: list[list[int]], then: list[int]) -> tuple[ModelRunner, Scheduler]:
    pool = KVPool(60, 1, 1, 4, torch.float32, torch.device("cpu"), 4, 32)
    s = Scheduler(pool, None, 4, chunk_size=100, policy="fcfs", new_token_ratio=1.0, eos_ids=set(), context_len=32, decode=lambda ids: "")
    for i, p in enumerate(prompts):
        s.add(Req(f"r{i}", p, SamplingParams(max_new_tokens=8), seed=0))
    s.process(s.schedule(), then)
    return ModelRunner(lambda *a: None, None, pool, torch.device("cpu")), s


def test_a_mixed_batch_matches_the_metadata_built_from_lists():
    runner, s = _step([[5, 6, 7], [8, 9]], [11, 12])  # two requests now decode
    s.add(Req("late", [1, 2, 3, 4], SamplingParams(max_new_tokens=8), seed=0))  # and a prompt joins them
    batch = s.schedule()
    inputs = runner.prepare(batch)
    table = runner.pool.req_to_token
    rows = [r.row for r in batch.reqs]
    assert inputs.ids.tolist() == [11, 12, 1, 2, 3, 4]
    assert inputs.positions.tolist() == [3, 2, 0, 1, 2, 3]
    assert inputs.ext == [1, 1, 4]
    slots = [table[row, p].item() for row, n, start in zip(rows, [1, 1, 4], [3, 2, 0]) for p in range(start, start + n)]
    assert len(set(slots)) == 6 and 0 not in slots
    expected = AttentionMetadata.build(torch.tensor(slots), table, rows, [4, 3, 4], [1, 1, 4])
    assert _fields(inputs.meta) == _fields(expected)
    assert inputs.meta.out_slots.dtype == torch.int64 and inputs.meta.max_extend_len.tolist() == [4]


def test_a_decode_batch_reads_each_requests_newest_slot():
    runner, s = _step([[5, 6, 7], [8, 9], [1, 2, 3, 4]], [11, 12, 13])
    batch = s.schedule()
    inputs = runner.prepare(batch)
    table = runner.pool.req_to_token
    assert inputs.meta.out_slots.tolist() == [table[r.row, r.kv_len].item() for r in batch.reqs]
    assert inputs.meta.extend_starts.tolist() == [0, 1, 2] and inputs.meta.max_extend_len.tolist() == [1]
