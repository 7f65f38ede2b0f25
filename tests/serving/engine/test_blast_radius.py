"""Whatever one request carries, the engine refuses or ends that request alone.

The HTTP side validates first; these tests go around it, straight to the engine, as a bug there would.
"""

import msgspec
import pytest

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import FinishAbort, FinishLength, GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def core() -> EngineCore:
    return EngineCore(ServerArgs(dtype="float32", disable_compile=True, max_running_requests=8, max_total_tokens=2048))


def drain(core: EngineCore) -> dict[str, dict]:
    out: dict[str, dict] = {}
    while core.has_work:
        for o in core.step():
            got = out.setdefault(o.rid, {"ids": [], "finish": None})
            got["ids"] += o.new_ids
            got["finish"] = o.finish_reason
    return out


@pytest.mark.parametrize(
    "msg,needle",
    [
        (GenerateRequest("bad", [1, 49152], GREEDY), "outside the vocabulary"),
        (GenerateRequest("bad", [1, -1], GREEDY), "outside the vocabulary"),
        (GenerateRequest("bad", [], GREEDY), "empty"),
        (GenerateRequest("bad", [1] * 9000, GREEDY), "context length"),
        (GenerateRequest("bad", [1, 2], msgspec.structs.replace(GREEDY, top_p=0.0)), "top_p"),
        (GenerateRequest("bad", [1, 2], msgspec.structs.replace(GREEDY, sampling_seed=2**64)), "sampling_seed"),
        (GenerateRequest("bad", [1, 2], msgspec.structs.replace(GREEDY, regex="[a-")), "Invalid regex"),
    ],
)
def test_admission_refuses_what_the_http_side_should_have(core, msg, needle):
    solo = core.add(GenerateRequest("solo", [5, 6, 7], GREEDY))
    refused = core.add(msg)  # at once, or (a grammar) once its compilation fails
    results = drain(core)
    reason = refused[0].finish_reason if refused else results["bad"]["finish"]
    assert isinstance(reason, FinishAbort) and reason.status_code == 400 and needle in reason.message, reason
    assert not solo and results["solo"]["finish"] == FinishLength(6)
    assert core.scheduler.available() == core.pool.size  # nothing the refused request touched is held


def test_a_request_whose_own_sampling_fails_ends_alone(core):
    core.add(GenerateRequest("a", [5, 6, 7], GREEDY))
    alone = drain(core)["a"]["ids"]
    core.add(GenerateRequest("a", [5, 6, 7], GREEDY))
    core.add(GenerateRequest("b", [8, 9, 10], msgspec.structs.replace(GREEDY, temperature=0.7)))
    # A logit bias on an id past the logits' width: past validation, penalties index out of range.
    victim = next(r for r in core.scheduler.waiting if r.rid == "b")
    victim.params = msgspec.structs.replace(victim.params, logit_bias={"999999": 1.0})
    results = drain(core)
    assert isinstance(results["b"]["finish"], FinishAbort) and "IndexError" in results["b"]["finish"].message
    assert results["a"]["ids"] == alone and results["a"]["finish"] == FinishLength(6)
    assert not core.has_work and core.scheduler.available() == core.pool.size
