"""Admission, reservation and release in the scheduler, without a model."""

import torch

from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.request import Req
from kiln.serving.messages import FinishAbort, FinishLength, FinishStop
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.engine.scheduler import Scheduler


def setup(slots: int = 40, rows: int = 4) -> Scheduler:
    pool = KVPool(slots, 1, 1, 4, torch.float32, torch.device("cpu"), rows, 64)
    return Scheduler(pool, None, rows, chunk_size=100, policy="fcfs", new_token_ratio=1.0, eos_ids={0}, context_len=64, decode=lambda ids: "")


def req(rid: str, prompt: int, new: int, **kw) -> Req:
    return Req(rid, list(range(1, prompt + 1)), SamplingParams(max_new_tokens=new, **kw), seed=0)


def test_admission_reserves_future_decode_slots():
    s = setup(slots=40)
    s.add(req("a", 10, 10))  # may need 20 slots
    s.add(req("b", 10, 10))  # 20 more: fits exactly
    s.add(req("c", 1, 1))  # would exceed the reservation: waits
    batch = s.schedule()
    assert [r.rid for r in batch.reqs] == ["a", "b"]
    assert batch.num_tokens == 20 and s.pool.free_slots == 20
    assert [r.rid for r in s.waiting] == ["c"]


def test_finish_and_abort_return_every_slot_and_row():
    s = setup()
    s.add(req("a", 3, 2))
    s.add(req("b", 3, 5))
    s.add(req("c", 3, 5))
    s.add(req("w", 30, 5))  # waits for room
    batch = s.schedule()
    s.process(batch, [7] * len(batch.reqs))
    batch = s.schedule()
    done = s.process(batch, [7] * len(batch.reqs))
    assert [r.rid for r in done] == ["a"] and done[0].finish_reason == FinishLength(2)
    aborted = s.abort("b")
    assert [type(r.finish_reason) for r in aborted] == [FinishAbort]
    assert {r.rid for r in s.abort("")} == {"c", "w"}
    assert not s.has_work
    assert s.pool.free_slots == s.pool.size and s.pool.free_rows == 4


def test_stop_token_and_eos_rules():
    s = setup()
    s.add(req("eos", 2, 5))
    s.add(req("ignore", 2, 3, ignore_eos=True))
    s.add(req("stopid", 2, 5, stop_token_ids=[9]))
    batch = s.schedule()
    done = s.process(batch, [0, 0, 9])
    reasons = {r.rid: r.finish_reason for r in done}
    assert reasons == {"eos": FinishStop(0), "stopid": FinishStop(9)}
    assert [r.rid for r in s.running] == ["ignore"]


def test_abort_after_a_failed_step_frees_the_step_slots_too():
    s = setup()
    s.add(req("a", 7, 3))
    s.schedule()  # slots for the prompt are taken; the forward then fails, process() never runs
    s.abort("")
    assert s.pool.free_slots == s.pool.size


def with_cache(slots: int = 64, rows: int = 4, chunk: int = 100, ratio: float = 1.0) -> Scheduler:
    from kiln.serving.engine.radix_cache import RadixCache

    pool = KVPool(slots, 1, 1, 4, torch.float32, torch.device("cpu"), rows, 64)
    return Scheduler(pool, RadixCache(), rows, chunk, "fcfs", ratio, eos_ids={0}, context_len=64, decode=lambda ids: "")


def run_to_end(s: Scheduler) -> None:
    while s.has_work:
        batch = s.schedule()
        s.process(batch, [7] * len(batch.reqs))


def test_a_shared_prefix_is_reused_and_reported():
    s = with_cache()
    s.add(req("a", 10, 2))
    run_to_end(s)
    b = Req("b", list(range(1, 11)) + [50, 51], SamplingParams(max_new_tokens=2), seed=0)
    s.add(b)
    batch = s.schedule()
    assert b.cached_tokens == 10 and batch.extends == [[50, 51]]
    s.process(batch, [7])
    run_to_end(s)
    assert s.available() == s.pool.size and s.cache.protected_size() == 0


def test_chunked_prefill_splits_a_long_prompt_and_keeps_decoding_others():
    s = with_cache(chunk=8)
    s.add(req("short", 2, 6))
    s.process(s.schedule(), [7])  # "short" now decodes
    s.add(Req("long", list(range(30, 50)), SamplingParams(max_new_tokens=2), seed=0))  # shares no prefix
    sizes = []
    while any(r.rid == "long" and not r.output_ids for r in s.running + list(s.waiting)):
        batch = s.schedule()
        assert batch.num_tokens <= 8
        sizes.append({r.rid: len(e) for r, e in zip(batch.reqs, batch.extends)})
        s.process(batch, [7] * len(batch.reqs))
    assert [x["long"] for x in sizes] == [7, 7, 6]  # 8-token budget minus the decode of "short"
    assert all(x.get("short") == 1 for x in sizes[:3] if "short" in x)
    run_to_end(s)
    assert s.available() == s.pool.size


def test_decode_retracts_the_newest_request_when_the_pool_runs_short():
    s = with_cache(slots=24, rows=3, ratio=0.0)  # admission reserves no output: decode must retract
    for k, name in enumerate("abc"):  # distinct prompts, so that nothing is shared through the cache
        s.add(Req(name, list(range(10 * k + 1, 10 * k + 7)), SamplingParams(max_new_tokens=6), seed=0))
    finished = []
    while s.has_work:
        batch = s.schedule()
        finished += [r.rid for r in s.process(batch, [7] * len(batch.reqs))]
    assert sorted(finished) == ["a", "b", "c"] and s.total_retractions > 0
    assert s.available() == s.pool.size
