"""Prefill and decode latency of one fixed batch, and the memory bandwidth decode achieves (gpt-fast style).

    kiln bench one-batch [--batch-sizes 1,8] [--input-len 128] [--output-len 32] [--dtype auto] [--disable-compile]

An engine runs in this process. Prefill is the time until every request of the batch has its first
token; a decode step is the mean time of the steps after that. Decode must read every weight once per
step plus each request's K/V so far, so achieved bandwidth = (weight bytes + KV bytes read per step) /
step time, printed beside the machine's own read bandwidth, measured here by summing a large tensor.
"""

import argparse
import random
import time
from typing import Any

import torch
from torch import nn

from kiln.bench.common import machine, source_version, write_result
from kiln.ops.quant_linear import Int4Linear, Int8Linear
from kiln.serving.engine.core import EngineCore
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the fastest of `repeats` sums over a float32 tensor of `gib` GiB (too big for any cache)."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_bytes_read(model: nn.Module, rows: int) -> int:
    """Bytes of weights a forward of `rows` rows reads: a quantized linear reads its packed weights, or its float32
    copy from `dense_from_rows` rows up; an embedding table reads its `rows` rows, unless a layer (a tied head)
    reads all of it."""
    read: dict[int, int] = {}  # by storage, so a tied table counts once
    tables: list[nn.Embedding] = []
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            tables.append(module)
            continue
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, (Int4Linear, Int8Linear)) and module.dense is not None:
            use_dense = rows >= module.dense_from_rows
            own = [t for t in own if (t is module.dense) == use_dense or t is module.bias]
        read.update({t.data_ptr(): t.numel() * t.element_size() for t in own})
    for table in tables:
        w = table.weight
        read.setdefault(w.data_ptr(), min(rows, w.shape[0]) * w.shape[1] * w.element_size())
    return sum(read.values())


def run_batch(core: EngineCore, batch: int, input_len: int, output_len: int, seed: int) -> tuple[float, list[float]]:
    """Prefill seconds and the seconds of every decode step, for `batch` random prompts decoded greedily together."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_new_tokens=output_len, ignore_eos=True)
    for i in range(batch):
        core.add(GenerateRequest(f"{seed}-{i}", [rng.randrange(1000, 40000) for _ in range(input_len)], params))
    started: set[str] = set()
    t0 = time.perf_counter()
    while len(started) < batch:
        started |= {o.rid for o in core.step() if o.new_ids}
    prefill = time.perf_counter() - t0
    steps = []
    while core.has_work:
        t0 = time.perf_counter()
        core.step()
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kiln bench one-batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--disable-compile", action="store_true")
    ap.add_argument("--torchao-config", default="", help="int8wo, int4wo-<group> or none (default: the server's)")
    ap.add_argument("--out", help="JSON results (default bench/results/one_batch-<dtype>.json)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    bandwidth = memory_bandwidth()
    core = EngineCore(ServerArgs(
        dtype=args.dtype, max_total_tokens=max(batches) * (args.input_len + args.output_len) + 64, max_running_requests=max(batches),
        disable_compile=args.disable_compile, torchao_config=args.torchao_config,
    ))  # fmt: skip
    dtype = str(core.dtype).removeprefix("torch.")
    per_token = KVPool.bytes_per_token(core.cfg.num_hidden_layers, core.cfg.num_key_value_heads, core.cfg.head_dim, core.dtype)
    run_batch(core, 2, 16, 4, seed=-1)  # first-call costs out of the timed runs
    weights = weight_bytes_read(core.model, 1)
    print(
        f"machine read bandwidth {bandwidth / 1e9:.1f} GB/s (sum of a 1 GiB tensor); weights read at batch 1 {weights / 1e6:.0f} MB"
        f" in {dtype} (quantization {core.quantization}); KV {per_token} B/token"
    )
    print(f"\n{'batch':>5} {'prefill ms':>11} {'decode ms/step':>15} {'tok/s':>8} {'GB/step':>8} {'GB/s':>7} {'of machine':>11} {'bound tok/s':>12}")
    rows = []
    for b in batches:
        prefill, steps = run_batch(core, b, args.input_len, args.output_len, seed=b)
        step = sum(steps) / len(steps)
        # Step j of decode attends over input_len + j tokens per request; the mean over the steps:
        kv = b * per_token * (args.input_len + (len(steps) + 1) / 2)
        moved = weight_bytes_read(core.model, b) + kv
        row = {
            "batch": b,
            "prefill_ms": prefill * 1000,
            "decode_step_ms": step * 1000,
            "decode_tok_s": b / step,
            "bytes_per_step": moved,
            "achieved_gb_s": moved / step / 1e9,
            "fraction_of_machine": moved / step / bandwidth,
            "bound_tok_s": b * bandwidth / moved,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{b:>5} {row['prefill_ms']:>11.1f} {row['decode_step_ms']:>15.2f} {row['decode_tok_s']:>8.1f} {moved / 1e9:>8.3f}"
            f" {row['achieved_gb_s']:>7.1f} {row['fraction_of_machine']:>10.0%} {row['bound_tok_s']:>12.1f}"
        )
    result: dict[str, Any] = {
        "benchmark": "one_batch",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": dtype,
        "quantization": core.quantization,
        "compiled": not args.disable_compile,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "machine_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weights,
        "kv_bytes_per_token": per_token,
        "rows": rows,
        "machine": machine(),
        "source": source_version(),
    }
    write_result(result, f"one_batch-{dtype}.json", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
