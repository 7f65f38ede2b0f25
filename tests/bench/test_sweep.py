"""The sweep gives the warm-up and every concurrency level prompts of their own (a prefix cache must not see a prompt twice)."""

from kiln.bench.datasets import BenchRequest
from kiln.bench.metrics import RequestResult
from kiln.bench.serve import parser, sweep


def test_levels_and_warmup_use_disjoint_prompts() -> None:
    prompts = [BenchRequest(f"p{i}", [i], 4) for i in range(2 + 1 + 3 + 5)]
    seen: list[tuple[int, int]] = []  # (prompt id, output length asked)

    async def send(client, req: BenchRequest) -> RequestResult:
        seen.append((req.prompt_ids[0], req.output_len))
        return RequestResult(prompt_len=1, success=True, chunks=[(0.01, 1), (0.02, req.output_len)], latency=0.03)

    args = parser().parse_args(["--max-concurrency", "1,2,4", "--num-prompts", "1,3,5", "--warmup-requests", "2"])
    args.levels, args.counts = [1, 2, 4], [1, 3, 5]
    runs = sweep("fake", send, args, prompts, cap=4)
    assert sorted(seen) == [(0, 4), (1, 4)] + [(i, 4) for i in range(2, 6)] + [(i, 4) for i in range(6, 10)]
    assert [r["num_prompts"] for r in runs] == [1, 3, 4]  # the cap trims the last level's 5 prompts to 4
    assert [r["metrics"]["sent"] for r in runs] == [1, 3, 4]
