"""CPU decode attention: the in-place kernel of compiled models against the eager gather + SDPA one.

    kiln bench cpu-attention [--batch-sizes 1,8,32] [--context 200,1000] [--heads 9] [--kv-heads 3] [--head-dim 64]

A pool with each request's slots scattered at random, SmolLM2's head shape by default, bfloat16 K/V. Both
kernels are checked against each other, then timed interleaved (this VM's speed drifts), medians of rounds.
K/V GB/s = the bytes of K and V decode must read (every cached token once) / time, printed beside this
machine's read bandwidth, measured by summing a large tensor.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from kiln.bench.common import machine, source_version, write_result
from kiln.bench.one_batch import memory_bandwidth
from kiln.ops.attention_decode_cpu import decode_inplace
from kiln.ops.attention_torch import decode_torch


def _median_ms(fns: dict[str, Callable[[], Any]], rounds: int, seconds: float) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                calls += 1
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_batch(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, rounds: int, seconds: float) -> dict[str, float]:
    gen = torch.Generator().manual_seed(batch)
    slots = batch * context
    k_cache, v_cache = (torch.randn(slots + 1, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    table = (torch.randperm(slots, generator=gen) + 1).to(torch.int32).view(batch, context)
    q = torch.randn(batch, heads, head_dim, generator=gen).bfloat16()
    rows, lens = torch.arange(batch), torch.full((batch,), context)
    args = (q, k_cache, v_cache, table, rows, lens, head_dim**-0.5, 0, 0.0)
    torch.testing.assert_close(decode_inplace(*args).float(), decode_torch(*args).float(), atol=2e-2, rtol=2e-2)
    ms = _median_ms({"sdpa": lambda: decode_torch(*args), "in_place": lambda: decode_inplace(*args)}, rounds, seconds)
    kv_bytes = 2 * slots * kv_heads * head_dim * 2
    return {"batch": batch, "context": context, "sdpa_ms": ms["sdpa"], "in_place_ms": ms["in_place"], "in_place_kv_gbs": kv_bytes / ms["in_place"] / 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kiln bench cpu-attention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--context", default="200,1000", help="tokens per request, comma-separated")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="timing per kernel per round")
    ap.add_argument("--out", default=None, help="JSON results (default bench/results/cpu_attention.json)")
    args = ap.parse_args(argv)
    bandwidth = memory_bandwidth() / 1e9
    print(f"this machine reads {bandwidth:.1f} GB/s (sum of a 1 GiB tensor)")
    results = []
    for context in (int(c) for c in args.context.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            r = bench_batch(batch, context, args.heads, args.kv_heads, args.head_dim, args.rounds, args.seconds)
            results.append(r)
            print(
                f"batch {batch:3d} x {context} tokens: gather + SDPA {r['sdpa_ms']:.3f} ms, in place {r['in_place_ms']:.3f} ms "
                f"({r['sdpa_ms'] / r['in_place_ms']:.2f}x), K/V read at {r['in_place_kv_gbs']:.1f} GB/s ({r['in_place_kv_gbs'] / bandwidth:.0%} of the machine's)"
            )
    result = {"benchmark": "cpu_attention", "read_gbs": bandwidth, "results": results, "machine": machine(), "source": source_version()}
    write_result(result, "cpu_attention.json", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
