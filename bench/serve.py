"""Serving benchmark: one load generator drives Kiln and its peers over HTTP, in one run, on this machine.

    kiln bench serve --peers kiln transformers transformers-batched llama.cpp --max-concurrency 1,8,32,64
    python -m kiln.bench.serve --base-url http://127.0.0.1:30000 --backend native   # a server already running

Each peer is started on 127.0.0.1, warmed up, driven at every concurrency level with the same prompts
(native /generate or OpenAI /v1/completions, streaming, greedy, EOS ignored), then stopped. Prints a
table per level and the ratios of the first peer to each other one; writes the JSON and, when
matplotlib is installed, a PNG next to it.
"""

import argparse
import asyncio
import importlib.util
import json
import math
import random
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from kiln.bench.backends import Send, native, openai_completions
from kiln.bench.common import RESULTS, free_port, machine, source_version
from kiln.bench.datasets import BenchRequest, random_requests, shared_prefix_requests
from kiln.bench.metrics import RequestResult, summarize
from kiln.bench.peers import launched, make_peer


async def run_load(send: Send, requests: list[BenchRequest], request_rate: float, max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Sends every request, Poisson arrivals at `request_rate` (inf: all at once), at most `max_concurrency` in flight."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = httpx.Timeout(connect=30.0, read=600.0, write=30.0, pool=None)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(req: BenchRequest) -> RequestResult:
            if gate is None:
                return await send(client, req)
            async with gate:
                return await send(client, req)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def make_dataset(args: argparse.Namespace, tokenizer: Any, n: int) -> list[BenchRequest]:
    if args.dataset == "shared-prefix":
        groups = math.ceil(n / args.gsp_prompts_per_group)
        reqs = shared_prefix_requests(tokenizer, groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len, args.gsp_question_len, args.gsp_output_len, args.seed)
        return reqs[:n]
    return random_requests(tokenizer, n, args.random_input_len, args.random_output_len, args.random_range_ratio, args.random_source, args.seed)


def fmt3(s: dict[str, float]) -> str:
    return f"{s['mean_ms']:.0f}/{s['median_ms']:.0f}/{s['p99_ms']:.0f}"


def print_report(runs: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> None:
    head = f"{'peer':28}{'conc':>5}{'sent':>5}{'fail':>5}{'req/s':>7}{'in tok/s':>9}{'out tok/s':>10}  {'TTFT ms':>14}  {'TPOT ms':>12}  {'ITL ms':>12}  {'E2E ms':>17}"
    print(f"\n{head}\n{'':54}(mean/median/p99 for the latency columns)")
    for r in runs:
        m = r["metrics"]
        print(
            f"{r['peer'][:28]:28}{r['concurrency'] or '-':>5}{m['sent']:>5}{m['failed']:>5}{m['request_throughput']:>7.2f}{m['input_tok_s']:>9.1f}"
            f"{m['output_tok_s']:>10.1f}  {fmt3(m['ttft']):>14}  {fmt3(m['tpot']):>12}  {fmt3(m['itl']):>12}  {fmt3(m['e2e']):>17}"
        )
        for f in m["failures"][:5]:
            print(f"    failed: {f}")
    if ratios:
        print(f"\n{'ratio':48}{'conc':>5}{'output tok/s':>14}{'TTFT median':>13}")
        for q in ratios:
            print(f"{q['label']:48}{q['concurrency'] or '-':>5}{q['output_tok_s']:>13.2f}x{q['ttft_median']:>12.2f}x")
        print("(output tok/s: first peer / other; TTFT median: other / first peer; above 1 favours the first peer)")


def ratios_against_first(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = runs[0]["peer"]
    ref = {r["concurrency"]: r["metrics"] for r in runs if r["peer"] == first}
    out = []
    for r in runs:
        m, k = r["metrics"], ref.get(r["concurrency"])
        if r["peer"] == first or k is None or not m["succeeded"] or not k["succeeded"]:
            continue
        out.append({
            "label": f"{first} / {r['peer']}",
            "peer": r["peer"],
            "concurrency": r["concurrency"],
            "output_tok_s": k["output_tok_s"] / m["output_tok_s"],
            "ttft_median": m["ttft"]["median_ms"] / k["ttft"]["median_ms"],
        })  # fmt: skip
    return out


def sweep(name: str, send: Send, args: argparse.Namespace, prompts: list[BenchRequest], cap: int | None) -> list[dict[str, Any]]:
    """Warm-up, then one run per concurrency level. Each level and the warm-up get prompts of their own, so a
    server with a prefix cache gains nothing from having seen a prompt in an earlier run."""
    warm = [BenchRequest(r.prompt, r.prompt_ids, min(r.output_len, 16)) for r in prompts[: args.warmup_requests]]
    for req in warm:  # one at a time: first-request costs (allocations, lazy compilation) out of the timed runs
        asyncio.run(run_load(send, [req], math.inf, 1, args.seed))
    runs = []
    start = args.warmup_requests
    for level, count in zip(args.levels, args.counts):
        n = min(count, cap) if cap else count
        results, duration = asyncio.run(run_load(send, prompts[start : start + n], args.request_rate, level, args.seed))
        start += count
        metrics = summarize(results, duration)
        runs.append({"peer": name, "concurrency": level, "request_rate": args.request_rate, "num_prompts": n, "metrics": metrics})
        print(f"{name} concurrency {level or '-'}: {metrics['succeeded']}/{metrics['sent']} ok, {metrics['output_tok_s']:.1f} output tok/s, {duration:.1f} s", flush=True)
    return runs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kiln bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", nargs="+", default=["kiln"], help="kiln, kiln[FLAGS], transformers, transformers-batched, llama.cpp; the first is the reference of the ratios")
    ap.add_argument("--base-url", help="drive a server that is already running instead of launching peers")
    ap.add_argument("--backend", choices=["native", "openai"], default="native", help="request format for --base-url")
    ap.add_argument("--model-name", default="default", help="the OpenAI `model` field for --base-url")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="served by Kiln and transformers (auto: Kiln's choice for this CPU)")
    ap.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    ap.add_argument("--random-input-len", type=int, default=256)
    ap.add_argument("--random-output-len", type=int, default=128)
    ap.add_argument("--random-range-ratio", type=float, default=1.0, help="lengths drawn from [len * ratio, len]")
    ap.add_argument("--random-source", choices=["text", "ids"], default="text", help="prompts of whole words, or of any tokens")
    ap.add_argument("--gsp-prompts-per-group", type=int, default=8)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=1000)
    ap.add_argument("--gsp-question-len", type=int, default=64)
    ap.add_argument("--gsp-output-len", type=int, default=128)
    ap.add_argument("--num-prompts", default="32", help="prompts per run: one number, or one per concurrency level")
    ap.add_argument("--max-concurrency", default="", help="comma list of levels, one run each (empty: no limit)")
    ap.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrival rate, requests/s (inf: all at once)")
    ap.add_argument("--peer-max-prompts", default="", help="caps for slow peers, e.g. transformers=8,llama.cpp=32")
    ap.add_argument("--warmup-requests", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json", help="JSON results; the PNG goes next to it")
    return ap


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `launched`, which stops the peer


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.levels = [int(c) for c in args.max_concurrency.split(",")] if args.max_concurrency else [None]
    counts = [int(n) for n in args.num_prompts.split(",")]
    if len(counts) not in (1, len(args.levels)):
        raise SystemExit("--num-prompts: give one number, or one per --max-concurrency level")
    args.counts = counts * len(args.levels) if len(counts) == 1 else counts
    caps = dict((k, int(v)) for k, v in (item.split("=") for item in args.peer_max_prompts.split(",") if item))

    # Imported here so that `--help` is quick and the module imports without torch's start-up cost.
    import torch

    from kiln.models.loader import default_model_path, resolve_checkpoint
    from kiln.serving.engine.device import resolve_dtype
    from kiln.serving.server_args import ServerArgs
    from kiln.serving.tokenizer import load_tokenizer

    checkpoint = resolve_checkpoint(None, Path(ServerArgs().cache_dir))
    tokenizer = load_tokenizer(str(checkpoint))
    dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    prompts = make_dataset(args, tokenizer, args.warmup_requests + sum(args.counts))
    started = datetime.now(timezone.utc)
    runs: list[dict[str, Any]] = []
    if args.base_url:
        send = native(args.base_url) if args.backend == "native" else openai_completions(args.base_url, args.model_name, tokenizer)
        runs += sweep(args.base_url, send, args, prompts, None)
    else:
        for spec in args.peers:
            port = free_port()
            peer = make_peer(spec, port, dtype, checkpoint, default_model_path(), tokenizer.eos_token_id)
            print(f"starting {spec}: {' '.join(peer.command)}", flush=True)
            with launched(peer, port, args.out.with_name(f"{args.out.stem}-{spec.replace(' ', '_').replace('/', '_')}.log")) as base:
                send = native(base, peer.extra_body) if peer.backend == "native" else openai_completions(base, "default", tokenizer, peer.extra_body)
                runs += sweep(spec, send, args, prompts, caps.get(spec))
    ratios = ratios_against_first(runs)
    print_report(runs, ratios)
    result = {
        "benchmark": "serve",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "dtype": dtype,
        "dataset": {k: v for k, v in vars(args).items() if k.startswith(("dataset", "random", "gsp", "seed"))},
        "machine": machine(),
        "source": source_version(),
        "runs": runs,
        "ratios": ratios,
        "wall_seconds": round((datetime.now(timezone.utc) - started).total_seconds(), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    else:
        from kiln.bench.plot import plot_serve

        png = args.out.with_suffix(".png")
        plot_serve(result, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
