"""Production features' costs: how long /update_weights_from_disk takes, and decode throughput with
`--enable-metrics` against without, in one run on one machine.

    .venv/bin/python -m kiln.bench.production [--dtype float32] [--disable-compile] [--requests 16] [--new-tokens 64]

Two `kiln serve` processes run side by side (metrics on and off) and take turns serving the same
greedy workload (--requests concurrent /generate calls, EOS ignored): one unmeasured round each,
then --rounds alternating rounds; the median rounds' output tokens per second are compared. The
cost of counting one output is also timed in-process. On the metrics server the weights are then
updated from the served checkpoint --updates times (each timed over HTTP), and the compile
counters are read before and after to show that nothing was recompiled.
"""

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from kiln.bench.common import RESULTS, launch_kiln, machine, source_version
from kiln.models.loader import resolve_checkpoint
from kiln.serving.api.metrics import ServingMetrics
from kiln.serving.messages import TokenOutput


def decode_round(url: str, requests: int, new_tokens: int) -> float:
    """Output tokens per second of `requests` concurrent greedy requests."""
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}

    def one(i: int) -> int:
        body = {"text": f"Request {i}: write a long story about a lighthouse keeper.", "sampling_params": params}
        return httpx.post(url + "/generate", json=body, timeout=600).json()["meta_info"]["completion_tokens"]

    t0 = time.monotonic()
    with ThreadPoolExecutor(requests) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens / (time.monotonic() - t0)


def count_cost(n: int = 100_000) -> float:
    """Microseconds the HTTP process spends counting one decode output (one token) with metrics on."""
    metrics = ServingMetrics("bench")
    timer = metrics.timer(streaming=True)
    out = TokenOutput("r", [42], 10, 0)
    timer.output(out)  # the first output is the time to first token
    t0 = time.perf_counter()
    for _ in range(n):
        timer.output(out)
    return (time.perf_counter() - t0) / n * 1e6


def updates(url: str, checkpoint: Path, count: int) -> dict[str, Any]:
    compile_before = httpx.get(url + "/get_server_info", timeout=30).json()["compile"]
    seconds = []
    for i in range(count):
        t0 = time.monotonic()
        reply = httpx.post(url + "/update_weights_from_disk", json={"model_path": str(checkpoint), "weight_version": f"v{i}"}, timeout=600)
        seconds.append(time.monotonic() - t0)
        if reply.status_code != 200:
            raise RuntimeError(reply.text)
    compile_after = httpx.get(url + "/get_server_info", timeout=30).json()["compile"]
    changed = {k: (compile_before[k], v) for k, v in compile_after.items() if k in compile_before and compile_before[k] != v}
    return {"update_seconds": seconds, "median_update_seconds": statistics.median(seconds), "compile_counters_changed": changed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.bench.production")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--disable-compile", action="store_true")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--updates", type=int, default=5)
    args = p.parse_args(argv)
    checkpoint = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    result: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args), "machine": machine(), "source": source_version()}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    flags = ["--dtype", args.dtype] + ["--disable-compile"] * args.disable_compile
    servers = {"on": launch_kiln([*flags, "--enable-metrics"]), "off": launch_kiln(flags)}
    try:
        for server in servers.values():
            decode_round(server.url, args.requests, args.new_tokens)  # first-use costs out of the way
        for _ in range(args.rounds):
            for key, server in servers.items():
                rates[key].append(decode_round(server.url, args.requests, args.new_tokens))
        result["weight_update"] = updates(servers["on"].url, checkpoint, args.updates)
    finally:
        for server in servers.values():
            server.stop()
    result["count_one_output_us"] = count_cost()
    on, off = (statistics.median(rates[k]) for k in ("on", "off"))
    result["decode_tok_s"] = {"metrics_on": rates["on"], "metrics_off": rates["off"], "median_on": on, "median_off": off, "on_over_off": on / off}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"production-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    wu = result["weight_update"]
    print(f"weight update (SmolLM2, {args.dtype}): median {wu['median_update_seconds']:.2f}s over {args.updates}; compile counters changed: {wu['compile_counters_changed'] or 'none'}")
    print(f"decode tok/s, {args.requests} requests x {args.new_tokens} tokens: metrics on {on:.1f}, off {off:.1f}, on/off {on / off:.3f}")
    print(f"counting one output token: {result['count_one_output_us']:.1f} us in the HTTP process")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
