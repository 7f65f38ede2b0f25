"""Offline throughput: every prompt handed to `kiln.Engine` in one generate call, against transformers' batched `generate`.

    kiln bench offline [--num-prompts 64] [--input-len 256] [--output-len 128] [--dtype auto] [--hf-batch-size 32]

The same random prompts (whole words, fixed lengths, seeded) go to both; greedy, EOS ignored, so
every request makes --output-len tokens. transformers runs them in left-padded batches of
--hf-batch-size (0 skips it). Prints requests/s, input and output tokens/s and Kiln/transformers.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

import kiln
from kiln.bench.common import RESULTS, machine, source_version
from kiln.bench.datasets import BenchRequest, random_requests
from kiln.models.loader import resolve_checkpoint
from kiln.serving.engine.device import resolve_dtype
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer


def figures(reqs: list[BenchRequest], outputs: int, seconds: float) -> dict[str, float]:
    inputs = sum(len(r.prompt_ids) for r in reqs)
    return {"seconds": seconds, "request_throughput": len(reqs) / seconds, "input_tok_s": inputs / seconds, "output_tok_s": outputs / seconds}


def run_kiln(reqs: list[BenchRequest], dtype: str) -> dict[str, float]:
    slots = sum(len(r.prompt_ids) + r.output_len for r in reqs) + 64
    engine = kiln.Engine(dtype=dtype, max_total_tokens=slots, max_running_requests=len(reqs), log_level="warning")
    try:
        params = [{"temperature": 0, "max_new_tokens": r.output_len, "ignore_eos": True} for r in reqs]
        engine.generate(input_ids=[r.prompt_ids for r in reqs[:2]], sampling_params=params[:2])  # first-call costs
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=[r.prompt_ids for r in reqs], sampling_params=params)
        seconds = time.perf_counter() - t0
    finally:
        engine.shutdown()
    return figures(reqs, sum(o["meta_info"]["completion_tokens"] for o in outs), seconds)


@torch.inference_mode()
def run_transformers(reqs: list[BenchRequest], checkpoint: Path, dtype: str, batch_size: int) -> dict[str, float]:
    tokenizer = load_tokenizer(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()

    def generate(batch: list[BenchRequest]) -> int:
        enc = tokenizer.pad({"input_ids": [r.prompt_ids for r in batch]}, padding_side="left", return_tensors="pt")
        n = max(r.output_len for r in batch)
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(batch)

    generate(reqs[:2])  # first-call costs
    t0 = time.perf_counter()
    outputs = sum(generate(reqs[i : i + batch_size]) for i in range(0, len(reqs), batch_size))
    return figures(reqs, outputs, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kiln bench offline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--hf-batch-size", type=int, default=32, help="transformers batch size; 0 skips transformers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON results (default bench/results/offline-<dtype>.json)")
    args = ap.parse_args(argv)
    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    checkpoint = resolve_checkpoint(None, Path(ServerArgs().cache_dir))
    reqs = random_requests(load_tokenizer(str(checkpoint)), args.num_prompts, args.input_len, args.output_len, seed=args.seed)

    results: dict[str, Any] = {"kiln": run_kiln(reqs, dtype)}
    if args.hf_batch_size:
        results["transformers"] = run_transformers(reqs, checkpoint, dtype, args.hf_batch_size)
    print(f"\n{args.num_prompts} prompts x ({args.input_len} in, {args.output_len} out), {dtype}")
    print(f"{'':14}{'seconds':>9}{'req/s':>8}{'in tok/s':>10}{'out tok/s':>11}")
    for name, r in results.items():
        print(f"{name:14}{r['seconds']:>9.1f}{r['request_throughput']:>8.2f}{r['input_tok_s']:>10.1f}{r['output_tok_s']:>11.1f}")
    if "transformers" in results:
        ratio = results["kiln"]["output_tok_s"] / results["transformers"]["output_tok_s"]
        results["kiln_over_transformers"] = ratio
        print(f"Kiln / transformers (batch {args.hf_batch_size}) output tok/s: {ratio:.2f}x")
    out = args.out or RESULTS / f"offline-{dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "offline", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": dtype, "args": {k: str(v) for k, v in vars(args).items()}}
    out.write_text(json.dumps(meta | results | {"machine": machine(), "source": source_version()}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # the engine process is spawned and re-imports this module
    raise SystemExit(main())
