"""Overlapped steps change no token: SmolLM2 in float32 gives the same outputs with and without
--enable-overlap-schedule, through stop rules, chunked prefill, retraction, aborts and seeded sampling."""

import pytest

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import FinishAbort, FinishLength, FinishStop, GenerateRequest, LogprobRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

SHARED = [100 + (i * 37) % 3000 for i in range(40)]
PROMPTS = [[7, 8, 9], SHARED + [4000, 4001], [200 + i for i in range(21)], SHARED + [4100, 4101, 4102], [300 + 3 * i for i in range(57)]]
NEW = [1, 9, 14, 5, 12]


def engine(overlap: bool, **kw) -> EngineCore:
    args = ServerArgs(dtype="float32", disable_compile=True, max_running_requests=6, enable_overlap_schedule=overlap, **kw)
    return EngineCore(args)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, **kw)


def run(core: EngineCore, reqs: dict[str, tuple[list[int], SamplingParams]], abort_after: dict[str, int] | None = None) -> dict[str, dict]:
    """Drives the engine to the end; abort_after[rid] = k aborts rid once it has k tokens."""
    for rid, (ids, params) in reqs.items():
        core.add(GenerateRequest(rid, ids, params, logprob=LogprobRequest(top_n=2) if rid.startswith("lp") else None))
    out: dict[str, dict] = {rid: {"ids": [], "finish": None, "logprobs": []} for rid in reqs}
    overlapped = False
    while core.has_work:
        outputs = core.step()
        overlapped |= core.inflight is not None
        for rid, k in (abort_after or {}).items():
            if len(out[rid]["ids"]) >= k and out[rid]["finish"] is None:
                outputs += core.abort(rid)
        for o in outputs:
            assert out[o.rid]["finish"] is None, "no output after the finish"
            out[o.rid]["ids"] += o.new_ids
            out[o.rid]["logprobs"] += o.token_logprobs or []
            out[o.rid]["finish"] = o.finish_reason
    assert overlapped == (core.overlap is not None)
    assert core.scheduler.available() == core.pool.size and not core.scheduler.running
    assert all(t >= 0 for r in out.values() for t in r["ids"])
    return out


@pytest.fixture(scope="module")
def pair():
    """Two engines, alike but for overlap: chunks of 16 tokens, the radix cache on."""
    return engine(False, max_total_tokens=4096, chunked_prefill_size=16), engine(True, max_total_tokens=4096, chunked_prefill_size=16)


def test_greedy_outputs_and_finishes_are_the_same(pair):
    sync, overlap = pair
    plain = {str(i): (p, greedy(n)) for i, (p, n) in enumerate(zip(PROMPTS, NEW))}
    ref = run(sync, plain)
    assert [len(ref[str(i)]["ids"]) for i in range(5)] == NEW
    # Stop rules that end requests mid-way: a stop id, a stop string, each from what the request generates.
    stop_id = ref["2"]["ids"][4]
    stop_text = next(t for t in (sync.tokenizer.decode([i]).strip() for i in ref["4"]["ids"][3:]) if t)
    reqs = {
        **plain,
        "stop_id": (PROMPTS[2], greedy(14, stop_token_ids=[stop_id])),
        "stop_str": (PROMPTS[4], greedy(12, stop=stop_text)),
        "eos": (PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=[ref["0"]["ids"][0]])),
    }
    want, got = run(sync, reqs), run(overlap, reqs)
    assert got == want
    assert want["stop_id"]["finish"] == FinishStop(stop_id) and len(want["stop_id"]["ids"]) < 14
    assert want["stop_str"]["finish"] == FinishStop(stop_text)
    assert want["eos"]["ids"] == ref["0"]["ids"][:1]
    assert all(want[str(i)]["finish"] == FinishLength(n) for i, n in enumerate(NEW))


def test_seeded_sampling_and_logprobs_are_the_same(pair):
    sync, overlap = pair
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, ignore_eos=True, sampling_seed=1234)
    reqs = {f"s{i}": (p, params) for i, p in enumerate(PROMPTS[:3])}
    reqs["lp"] = (PROMPTS[3], greedy(6))
    want, got = run(sync, reqs), run(overlap, reqs)
    assert [got[r]["ids"] for r in reqs] == [want[r]["ids"] for r in reqs]
    assert len(got["lp"]["logprobs"]) == 6 and got["lp"]["logprobs"] == pytest.approx(want["lp"]["logprobs"], abs=1e-5)


def test_an_abort_mid_generation_ends_only_that_request(pair):
    sync, overlap = pair
    reqs = {str(i): (p, greedy(n + 6)) for i, (p, n) in enumerate(zip(PROMPTS, NEW))}
    ref = run(sync, reqs)
    got = run(overlap, reqs, abort_after={"1": 3})
    assert isinstance(got["1"]["finish"], FinishAbort)
    assert got["1"]["ids"] == ref["1"]["ids"][: len(got["1"]["ids"])] and len(got["1"]["ids"]) < len(ref["1"]["ids"])
    assert all(got[r] == ref[r] for r in reqs if r != "1")


def test_retraction_in_a_tiny_pool_gives_the_same_tokens():
    prompts = [SHARED + [4000 + i, 4100 + i] for i in range(5)]
    reqs = {str(i): (p, greedy(10)) for i, p in enumerate(prompts)}
    # Admission reserves no output: four 42-token prompts fit in 180 slots, their decode does not.
    tiny = dict(max_total_tokens=180, schedule_conservativeness=0.0, disable_radix_cache=True)
    want = run(engine(False, **tiny), reqs)
    core = engine(True, **tiny)
    got = run(core, reqs)
    assert core.scheduler.total_retractions > 0
    assert got == want
