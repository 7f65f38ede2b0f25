"""Data-parallel routing: the radix cache hit rate of a shared-prefix workload at --dp-size 2, against one engine.

    kiln bench dp-routing [--groups 8] [--prompts-per-group 8] [--system-prompt-len 256] [--concurrency 16]

Serves the default model (eager, float32) three times: --dp-size 1, --dp-size 2 routing by prefix
(cache_aware, the default), and --dp-size 2 routing by load alone (shortest_queue). Each gets the same
requests: groups of prompts sharing a system prompt, each with its own question, shuffled (SGLang's
generated-shared-prefix shape), at most --concurrency in flight. The hit rate is sum(cached_tokens) /
sum(prompt_tokens) from the responses; "in trees" sums the engines' radix cache sizes afterwards, which
grows by a system prompt each time a second engine computes it. One engine is the reference: each system
prompt is held once (prompts of a group that arrive together may each compute it, whatever the routing).
"""

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from kiln.bench.common import launch_kiln, machine, source_version, write_result
from kiln.bench.datasets import BenchRequest, shared_prefix_requests
from kiln.models.loader import resolve_checkpoint
from kiln.serving.tokenizer import load_tokenizer


async def drive(url: str, requests: list[BenchRequest], concurrency: int) -> tuple[list[dict[str, Any]], float]:
    """Sends every request greedily (EOS ignored), at most `concurrency` at once; returns their meta_info and the wall time."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:

        async def one(req: BenchRequest) -> dict[str, Any]:
            params = {"temperature": 0, "max_new_tokens": req.output_len, "ignore_eos": True}
            async with gate:
                resp = await client.post("/generate", json={"input_ids": req.prompt_ids, "sampling_params": params})
            resp.raise_for_status()
            return resp.json()["meta_info"]

        start = time.perf_counter()
        metas = await asyncio.gather(*(one(r) for r in requests))
        return list(metas), time.perf_counter() - start


def measure(flags: list[str], requests: list[BenchRequest], concurrency: int) -> dict[str, Any]:
    server = launch_kiln(flags)
    try:
        metas, wall = asyncio.run(drive(server.url, requests, concurrency))
        states = httpx.get(server.url + "/get_server_info", trust_env=False).json()["internal_states"]
    finally:
        server.stop()
    cached, prompt = sum(m["cached_tokens"] for m in metas), sum(m["prompt_tokens"] for m in metas)
    return {
        "cached_tokens": cached, "prompt_tokens": prompt, "hit_rate": round(cached / prompt, 4), "wall_s": round(wall, 2),
        "tokens_in_trees": [s["cached_tokens_in_tree"] for s in states],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench dp-routing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--prompts-per-group", type=int, default=8)
    p.add_argument("--system-prompt-len", type=int, default=256)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-total-tokens", type=int, default=16384, help="per engine")
    p.add_argument("--out", default=None, help="where the JSON goes (default: bench/results/dp_routing.json)")
    args = p.parse_args(argv)
    flags = ["--dtype", args.dtype, "--disable-compile", "--max-total-tokens", str(args.max_total_tokens)]
    tokenizer = load_tokenizer(str(resolve_checkpoint(None, Path.home() / ".cache" / "kiln")))  # the default model's
    requests = shared_prefix_requests(
        tokenizer, args.groups, args.prompts_per_group, args.system_prompt_len, args.question_len, args.output_len
    )  # fmt: skip
    result: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(), "source": source_version(),
        "workload": {k: v for k, v in vars(args).items() if k != "out"},
    }  # fmt: skip
    runs = {
        "dp1": ["--dp-size", "1"],
        "dp2_cache_aware": ["--dp-size", "2", "--load-balance-method", "cache_aware"],
        "dp2_shortest_queue": ["--dp-size", "2", "--load-balance-method", "shortest_queue"],
    }
    for name, extra in runs.items():
        r = result[name] = measure([*flags, *extra], requests, args.concurrency)
        print(
            f"{name:>18}: hit rate {r['hit_rate']:.1%} ({r['cached_tokens']} of {r['prompt_tokens']} prompt tokens cached), "
            f"in trees {sum(r['tokens_in_trees'])} {r['tokens_in_trees']}, {r['wall_s']:.1f}s"
        )  # fmt: skip
    write_result(result, "dp_routing.json", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
