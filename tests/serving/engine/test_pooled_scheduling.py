"""Prefill-only requests (embeddings, classifiers) in the scheduler: computed whole, finished after one step."""

import torch

from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.request import Req
from kiln.serving.messages import FinishLength
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.engine.scheduler import Scheduler


def pooled_scheduler(chunk: int) -> Scheduler:
    pool = KVPool(100, 1, 1, 4, torch.float32, torch.device("cpu"), 8, 64)
    return Scheduler(pool, None, 8, chunk, "fcfs", 1.0, {0}, 64, lambda ids: "", split_prompts=False)


def pooled(rid: str, n: int) -> Req:
    return Req(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=0), seed=0)


def test_prompts_are_never_split_and_finish_after_their_forward():
    s = pooled_scheduler(chunk=16)
    for rid, n in [("a", 10), ("b", 10), ("c", 6)]:
        s.add(pooled(rid, n))
    batch = s.schedule()
    # b does not fit the 6 tokens left in this step's budget: it waits whole rather than being chunked.
    assert [r.rid for r in batch.reqs] == ["a"] and batch.extends == [list(range(1, 11))]
    done = s.process(batch, [-1])
    assert [r.rid for r in done] == ["a"] and done[0].finish_reason == FinishLength(0)
    assert done[0].output_ids == []
    batch = s.schedule()
    assert [r.rid for r in batch.reqs] == ["b", "c"] and batch.num_tokens == 16
    assert len(s.process(batch, [-1, -1])) == 2
    assert not s.has_work and s.pool.free_slots == s.pool.size and s.pool.free_rows == 8
