"""The `kiln::moe` op against the per-expert loop transformers runs, and decode tok/s of a tiny random MoE model.

    kiln bench moe [--tokens 1,32,256] [--hidden 2048] [--intermediate 768] [--experts 128] [--top-k 8]
                   [--dtype float32] [--batch-sizes 1,8] [--output-len 32] [--no-compile]

Op: one MoE layer shaped like Qwen3-30B-A3B's (hidden 2048, 128 experts of 768, top 8, renormalised),
random weights and router. Each token count is timed three ways: `kiln::moe` eagerly; inside
`torch.compile` (router GEMM, the op and the residual add, as a model's compiled piece calls it); and
the loop of transformers' `Qwen2MoeExperts.forward` (one-hot expert mask, a GEMM pair per expert hit,
index_add_), written out below. Both Kiln outputs are checked against the loop's before any timing.
Weight GB/s = bytes of the experts hit (each read once per call) / the op's median time.

Model: a random Qwen2-MoE checkpoint saved by transformers (4 layers, 16 experts, top 4, a shared
expert), served by an engine in this process, eager and compiled; decode tok/s is one_batch's figure.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.bench.common import machine, source_version, write_result
from kiln.bench.one_batch import memory_bandwidth, run_batch
from kiln.ops.moe import moe
from kiln.serving.engine.core import EngineCore
from kiln.serving.server_args import ServerArgs

TINY_MODEL = dict(
    vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, intermediate_size=512,
    moe_intermediate_size=128, shared_expert_intermediate_size=256, num_experts=16, num_experts_per_tok=4, max_position_embeddings=1024,
)  # fmt: skip


def loop_moe(x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int, renormalize: bool) -> Tensor:
    """transformers 5's Qwen2MoeTopKRouter, then Qwen2MoeExperts.forward: the baseline."""
    weights, ids = torch.topk(torch.softmax(router_logits, dim=-1, dtype=torch.float), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(x.dtype)
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=w13.shape[0]).permute(2, 1, 0)  # [E, top_k, T]
    for expert in mask.sum(dim=(-1, -2)).nonzero()[:, 0].tolist():
        pos, rows = torch.where(mask[expert])
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * weights[rows, pos, None]
        out.index_add_(0, rows, y)
    return out


def median_ms(fn: Callable[[], Any], seconds: float, min_repeats: int = 5) -> float:
    """Median ms per call over about `seconds` of calls (at least `min_repeats`), after two untimed calls
    (the compiled function compiles in the first)."""
    fn(), fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_repeats or (time.perf_counter() < end and len(times) < 500):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def bench_op(args: argparse.Namespace, dtype: torch.dtype, bandwidth: float) -> list[dict[str, Any]]:
    h, i, e, k = args.hidden, args.intermediate, args.experts, args.top_k
    gen = torch.Generator().manual_seed(0)
    # Scaled so that activations stay near unit size whatever the shape.
    w13 = torch.randn(e, 2 * i, h, generator=gen, dtype=dtype).mul_(h**-0.5)
    w2 = torch.randn(e, h, i, generator=gen, dtype=dtype).mul_(i**-0.5)
    router = torch.randn(e, h, generator=gen, dtype=dtype).mul_(h**-0.5)
    counts = torch.zeros(e, dtype=torch.int64)
    per_expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    renorm = not args.no_renormalize

    def layer(x: Tensor, num_tokens: Tensor) -> Tensor:
        return x + moe(x, F.linear(x, router), w13, w2, k, renorm, num_tokens, counts)

    compiled = torch.compile(layer, dynamic=False)
    # The op and the loop run different GEMMs (oneDNN or MKL, other row counts): bfloat16 rounds apart, float32 must not.
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    print(f"\n{'tokens':>6} {'experts hit':>11} {'op ms':>8} {'compiled ms':>11} {'loop ms':>8} {'loop/op':>8} {'loop/compiled':>13} {'op GB/s':>8} {'of machine':>10}")
    rows = []
    for t in args.tokens:
        x = torch.randn(t, h, generator=gen, dtype=dtype)
        logits, n = F.linear(x, router), torch.tensor(t)
        want = loop_moe(x, logits, w13, w2, k, renorm)
        before = counts.clone()
        got = moe(x, logits, w13, w2, k, renorm, n, counts)
        hit = int((counts - before).count_nonzero())  # the op's own count of experts it ran
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"kiln::moe differs from the loop at {t} tokens: {m}")
        torch.testing.assert_close(compiled(x, n), x + want, **tol, msg=lambda m: f"compiled layer differs at {t} tokens: {m}")
        op = median_ms(lambda: moe(x, logits, w13, w2, k, renorm, n, counts), args.seconds)
        comp = median_ms(lambda: compiled(x, n), args.seconds)
        loop = median_ms(lambda: loop_moe(x, logits, w13, w2, k, renorm), args.seconds)
        gb_s = hit * per_expert_bytes / (op / 1e3) / 1e9
        row = {
            "tokens": t, "experts_hit": hit, "op_ms": op, "compiled_ms": comp, "loop_ms": loop, "loop_over_op": loop / op,
            "loop_over_compiled": loop / comp, "expert_bytes_read": hit * per_expert_bytes, "op_weight_gb_s": gb_s,
            "fraction_of_machine": gb_s * 1e9 / bandwidth, "max_abs_diff_vs_loop": (got - want).abs().max().item(),
        }  # fmt: skip
        rows.append(row)
        print(f"{t:>6} {hit:>11} {op:>8.2f} {comp:>11.2f} {loop:>8.2f} {loop / op:>8.2f} {loop / comp:>13.2f} {gb_s:>8.1f} {row['fraction_of_machine']:>10.0%}")
    return rows


class _FoldedIds:
    """run_batch draws prompt ids from a real tokenizer's range (up to 40000); the tiny model has 1024."""

    def __init__(self, core: EngineCore):
        self.core, self.vocab = core, core.cfg.vocab_size

    def add(self, msg: Any) -> Any:
        return self.core.add(msgspec.structs.replace(msg, input_ids=[t % self.vocab for t in msg.input_ids]))

    def step(self) -> Any:
        return self.core.step()

    @property
    def has_work(self) -> bool:
        return self.core.has_work


def bench_model(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    Qwen2MoeForCausalLM(Qwen2MoeConfig(**TINY_MODEL)).save_pretrained(root / "model")
    # Compile only the decode sizes timed, and one prefill bucket for the warm-up batch: all else runs eagerly.
    profile = root / "profile.toml"
    profile.write_text(f"[buckets]\ndecode_batch_sizes = {args.batch_sizes}\nprefill_token_counts = [32]\nchunked_prefill_size = 2048\n[inductor]\n")
    print(f"\n{'engine':>8} {'start s':>8} {'batch':>5} {'decode ms/step':>15} {'tok/s':>8}")
    rows = []
    for compiled in [False, True] if args.compile else [False]:
        t0 = time.perf_counter()
        core = EngineCore(ServerArgs(
            model_path=str(root / "model"), skip_tokenizer_init=True, dtype=args.dtype, disable_compile=not compiled,
            profile=str(profile), compile_cache_dir=str(root / "cache"), max_running_requests=max(args.batch_sizes),
            max_total_tokens=max(args.batch_sizes) * (args.input_len + args.output_len) + 64,
        ))  # fmt: skip
        start = time.perf_counter() - t0
        engine = _FoldedIds(core)
        run_batch(engine, 2, 16, 4, seed=-1)  # first-call costs out of the timed runs
        for b in args.batch_sizes:
            _, steps = run_batch(engine, b, args.input_len, args.output_len, seed=b)
            step = sum(steps) / len(steps)
            name = "compiled" if compiled else "eager"
            rows.append({"engine": name, "startup_s": start, "batch": b, "decode_step_ms": step * 1000, "decode_tok_s": b / step})
            print(f"{name:>8} {start:>8.1f} {b:>5} {step * 1000:>15.2f} {b / step:>8.1f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(prog="kiln bench moe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=ints, default=[1, 32, 256], help="token counts the op is timed at")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768, help="each expert's intermediate size")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--no-renormalize", action="store_true", help="keep the top-k softmax weights as they are (Qwen2-MoE)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seconds", type=float, default=2.0, help="time spent on each timed variant and token count")
    ap.add_argument("--batch-sizes", type=ints, default=[1, 8], help="decode batch sizes of the tiny model")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also time the tiny model compiled")
    ap.add_argument("--out", help="JSON results (default bench/results/moe-<dtype>.json)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    bandwidth = memory_bandwidth()
    print(f"machine read bandwidth {bandwidth / 1e9:.1f} GB/s; layer: hidden {args.hidden}, {args.experts} experts of {args.intermediate}, top {args.top_k}, {args.dtype}")
    op_rows = bench_op(args, dtype, bandwidth)
    with tempfile.TemporaryDirectory(prefix="kiln-moe-bench-") as root:
        model_rows = bench_model(args, Path(root))
    result: dict[str, Any] = {
        "benchmark": "moe",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dtype": args.dtype,
        "layer": {"hidden": args.hidden, "intermediate": args.intermediate, "experts": args.experts, "top_k": args.top_k, "renormalize": not args.no_renormalize},
        "machine_bandwidth_gb_s": bandwidth / 1e9,
        "op": op_rows,
        "model": {"config": TINY_MODEL, "input_len": args.input_len, "output_len": args.output_len, "rows": model_rows},
        "machine": machine(),
        "source": source_version(),
    }
    write_result(result, f"moe-{args.dtype}.json", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
