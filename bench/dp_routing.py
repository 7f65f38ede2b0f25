"""Data-parallel routing: the radix cache hit rate of a shared-prefix workload at --dp-size 2, against one engine.

    kiln bench dp-routing [--groups 8] [--prompts-per-group 8] [--system-prompt-len 256] [--concurrency 16]

Serves the default model with --dp-size 1, then 2 (eager, float32), and sends both the same requests: groups of
prompts sharing a system prompt, each with its own question, shuffled (SGLang's generated-shared-prefix
shape), at most --concurrency in flight. The hit rate is sum(cached_tokens) / sum(prompt_tokens) from the
responses. One engine is the ceiling: each system prompt is computed once. A router blind to prefixes
would spread every group over both engines and compute each system prompt twice; the line "prefix-blind"
gives that rate, computed rather than measured.
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


def measure(dp_size: int, flags: list[str], requests: list[BenchRequest], concurrency: int) -> dict[str, Any]:
    server = launch_kiln([*flags, "--dp-size", str(dp_size)])
    try:
        metas, wall = asyncio.run(drive(server.url, requests, concurrency))
    finally:
        server.stop()
    cached, prompt = sum(m["cached_tokens"] for m in metas), sum(m["prompt_tokens"] for m in metas)
    return {"cached_tokens": cached, "prompt_tokens": prompt, "hit_rate": round(cached / prompt, 4), "wall_s": round(wall, 2)}


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
    for dp_size in (1, 2):
        result[f"dp{dp_size}"] = measure(dp_size, flags, requests, args.concurrency)
    total = result["dp1"]["prompt_tokens"]
    # each engine computes a group's system prompt once: every prompt after the first two of its group can hit it
    reusable = args.groups * max(0, args.prompts_per_group - 2) * args.system_prompt_len
    result["prefix_blind_hit_rate"] = round(reusable / total, 4)
    for name in ("dp1", "dp2"):
        r = result[name]
        print(f"{name}: hit rate {r['hit_rate']:.1%} ({r['cached_tokens']} of {r['prompt_tokens']} prompt tokens cached), {r['wall_s']:.1f}s")
    print(f"prefix-blind routing at dp2 (each system prompt computed on both engines): at most {result['prefix_blind_hit_rate']:.1%}")
    write_result(result, "dp_routing.json", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
