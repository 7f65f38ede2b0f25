"""Production features' costs: how long /update_weights_from_disk takes, and decode throughput with
`--enable-metrics` against without, in one run on one machine.

    .venv/bin/python -m kiln.bench.production [--dtype float32] [--disable-compile] [--requests 16] [--new-tokens 64]

Two `kiln serve` processes run one after the other (metrics on, then off), each serving the same
greedy workload (--requests concurrent /generate calls, EOS ignored) --rounds times; the median
round's output tokens per second are compared. On the first server the weights are then updated
from the served checkpoint --updates times (each timed over HTTP), and the compile counters are
read before and after to show that nothing was recompiled.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from kiln.bench.common import RESULTS, free_port, machine, source_version
from kiln.models.loader import resolve_checkpoint


def start(args: argparse.Namespace, metrics: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("kiln")), "serve", "--port", str(port), "--dtype", args.dtype, "--log-level", "warning"]
    cmd += ["--enable-metrics"] * metrics + ["--disable-compile"] * args.disable_compile
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)


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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--updates", type=int, default=5)
    args = p.parse_args(argv)
    checkpoint = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    result: dict[str, Any] = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args), "machine": machine(), "source": source_version()}
    rates: dict[str, list[float]] = {}
    for metrics in (True, False):
        proc, url = start(args, metrics)
        try:
            decode_round(url, 2, 4)  # first-request costs out of the way
            rates["on" if metrics else "off"] = [decode_round(url, args.requests, args.new_tokens) for _ in range(args.rounds)]
            if metrics:
                result["weight_update"] = updates(url, checkpoint, args.updates)
        finally:
            proc.terminate()
            proc.wait(60)
    on, off = (statistics.median(rates[k]) for k in ("on", "off"))
    result["decode_tok_s"] = {"metrics_on": rates["on"], "metrics_off": rates["off"], "median_on": on, "median_off": off, "on_over_off": on / off}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"production-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(result, indent=2))
    wu = result["weight_update"]
    print(f"weight update (SmolLM2, {args.dtype}): median {wu['median_update_seconds']:.2f}s over {args.updates}; compile counters changed: {wu['compile_counters_changed'] or 'none'}")
    print(f"decode tok/s, {args.requests} requests x {args.new_tokens} tokens: metrics on {on:.1f}, off {off:.1f}, on/off {on / off:.3f}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
