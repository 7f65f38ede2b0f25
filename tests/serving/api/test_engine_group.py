"""EngineGroup's decisions, over stand-in engine clients: where requests go, which ids it refuses, what an engine's death does."""

import asyncio
from types import SimpleNamespace

import pytest

from kiln.serving.api.engine_group import EngineGroup
from kiln.serving.sampling_params import InvalidRequest
from kiln.serving.server_args import ServerArgs

SHORT_A, SHORT_B = [5, 6, 7], [8, 9]  # shorter than a routing block
LONG_A, LONG_B = list(range(100, 164)), list(range(200, 264))


class StandIn:
    """What the group uses of an EngineClient, with no process behind it."""

    def __init__(self) -> None:
        self.info = SimpleNamespace(limits=SimpleNamespace(max_total_tokens=4096))
        self.queues: dict[str, asyncio.Queue] = {}
        self.unavailable: str | None = None
        self.dead = False
        self.failed: list[str] = []
        self.on_death = None
        self.name = "engine process dp?"

    @property
    def num_in_flight(self) -> int:
        return len(self.queues)

    def open(self, rid: str) -> asyncio.Queue:
        self.queues[rid] = asyncio.Queue()
        return self.queues[rid]

    def close(self, rid: str, queue: asyncio.Queue) -> None:
        if self.queues.get(rid) is queue:
            del self.queues[rid]

    def stop_accepting(self, reason: str) -> None:
        self.unavailable = self.unavailable or reason

    def fail_in_flight(self, message: str) -> None:
        self.failed.append(message)


def group(method: str = "cache_aware") -> tuple[EngineGroup, list[StandIn]]:
    engines = [StandIn(), StandIn()]
    return EngineGroup(ServerArgs(dp_size=2, load_balance_method=method), engines), engines  # type: ignore[arg-type]


def holders(engines: list[StandIn]) -> list[list[str]]:
    return [sorted(e.queues) for e in engines]


def test_prompts_spread_by_load_and_samples_of_one_prompt_stay_together():
    g, engines = group()
    g.open(["a-0", "a-1", "b"], [SHORT_A, SHORT_A, SHORT_B])
    assert holders(engines) == [["a-0", "a-1"], ["b"]]
    g.open(["c"], [SHORT_B])  # short prompts follow load: engine 1 holds fewer
    assert holders(engines) == [["a-0", "a-1"], ["b", "c"]]


@pytest.mark.parametrize("method, expected", [("cache_aware", 1), ("shortest_queue", 0)])
def test_a_prefix_goes_back_to_its_engine_unless_routing_by_load(method: str, expected: int):
    g, engines = group(method)
    qa, qb = g.open(["a"], [LONG_A]), g.open(["b"], [LONG_B])
    assert holders(engines) == [["a"], ["b"]]
    g.close(["a"], qa)
    g.close(["b"], qb)
    # both idle: load alone says engine 0; LONG_B's prefix was sent to engine 1
    g.open(["c"], [LONG_B + [1, 2, 3]])
    assert "c" in engines[expected].queues


def test_an_id_in_flight_on_any_engine_is_refused_until_closed():
    g, engines = group()
    queues = g.open(["r"], [SHORT_A])
    with pytest.raises(InvalidRequest, match="Duplicate request ID detected: r"):
        g.open(["r"], [SHORT_B])  # would go to the other engine
    with pytest.raises(InvalidRequest, match=r"within the request: \['s'\]"):
        g.open(["s", "s"], [SHORT_A, SHORT_B])
    assert holders(engines) == [["r"], []]
    g.close(["r"], queues)
    g.open(["r"], [SHORT_B])
    assert g.num_in_flight == 1


def test_one_death_fails_the_other_engines_requests_once():
    g, engines = group()
    deaths: list[int] = []
    g.on_death = lambda: deaths.append(1)
    engines[0].dead, engines[0].name = True, "engine process dp0"
    engines[0].on_death()
    assert engines[1].failed == ["The engine process dp0 exited."]
    assert engines[1].unavailable == "The engine process dp0 exited; the server is shutting down."
    assert g.dead and g.unavailable is not None
    engines[1].dead = True
    engines[1].on_death()  # the second death changes nothing more
    assert deaths == [1] and engines[1].failed == ["The engine process dp0 exited."]
