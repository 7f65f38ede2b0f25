"""Radix cache benchmark: 64 requests sharing a 1,000-token prefix, with and without the cache.

    .venv/bin/python -m kiln.bench.prefix_cache [--requests 64] [--prefix 1000] [--dtype bfloat16]

All requests arrive at once at an in-process engine (eager, so compile time stays out of it).
Time to first token is measured per request from submission; throughput is output tokens over
the whole run. The cache run warms the tree with one request first, as a served system prompt
would be; that request is not counted.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

RESULTS = Path(__file__).parent / "results"


def run(core: EngineCore, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.monotonic()
    for i, ids in enumerate(prompts):
        core.add(GenerateRequest(str(i), ids, params))
    first: dict[str, float] = {}
    cached, tokens = 0, 0
    while core.has_work:
        for out in core.step():
            if out.new_ids and out.rid not in first:
                first[out.rid] = time.monotonic() - t0
                cached += out.cached_tokens
            tokens += len(out.new_ids)
    wall = time.monotonic() - t0
    ttft = sorted(first.values())
    return {
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))],
        "output_tok_s": tokens / wall,
        "wall_s": wall,
        "cached_tokens": cached,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    prefix = [200 + (i * 7919) % 40000 for i in range(args.prefix)]
    prompts = [prefix + [45000 + i, 46000 + i, 47000 + i] for i in range(args.requests)]
    result = {"requests": args.requests, "prefix": args.prefix, "new_tokens": args.new_tokens, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d")}
    for name, off in (("no_cache", True), ("cache", False)):
        core = EngineCore(ServerArgs(dtype=args.dtype, disable_compile=True, disable_radix_cache=off, max_running_requests=args.requests, max_total_tokens=200_000))
        if not off:
            run(core, [prefix + [1]], 1)
        result[name] = run(core, prompts, args.new_tokens)
        del core
    a, b = result["no_cache"], result["cache"]
    print(f"{'':12} {'TTFT mean':>10} {'TTFT p50':>10} {'TTFT p99':>10} {'out tok/s':>10} {'cached tok':>11}")
    for name, r in (("no cache", a), ("radix cache", b)):
        print(f"{name:12} {r['ttft_mean_s']:>9.2f}s {r['ttft_p50_s']:>9.2f}s {r['ttft_p99_s']:>9.2f}s {r['output_tok_s']:>10.1f} {r['cached_tokens']:>11}")
    result["ttft_speedup"] = a["ttft_mean_s"] / b["ttft_mean_s"]
    result["throughput_ratio"] = b["output_tok_s"] / a["output_tok_s"]
    print(f"\nTTFT (mean) {result['ttft_speedup']:.1f}x better with the cache; throughput {result['throughput_ratio']:.1f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefix_cache.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
