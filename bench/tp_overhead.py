"""What tensor parallel costs per forward on the CPU: SmolLM2 (float32, eager) decode steps on one rank and on
two gloo ranks sharing the machine's cores, and the collectives' share.

    python -m kiln.bench.tp_overhead [--batch-sizes 1,8] [--context 64] [--steps 40]

Each setting runs in fresh processes: one rank with 2 threads and with 1, two ranks with 1 thread each,
two ranks whose collectives are replaced by stand-ins of the same shapes that move nothing (wrong
numbers, the same arithmetic; the gap to the real ones is what the collectives cost, waiting for the slower
rank included), and a step's collectives alone (2 per layer + 1 all-reduces of [batch, hidden] and the
all-gather of [batch, vocab / 2], no model). A step is one
decode forward plus `compute_logits` for every request at `context` tokens; ranks start each step
together (a barrier), and the median of `steps` steps is reported.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.models import llama
from kiln.models.loader import load_model, read_config, resolve_checkpoint
from kiln.ops import vocab_parallel
from kiln.ops.attention import AttentionMetadata
from kiln.ops.collectives import all_gather_columns, all_reduce
from kiln.ops.tensor_parallel import TensorParallel


def _without_collectives() -> None:
    """Stand-ins for the collectives with the same output shapes (this benchmark's ablation only)."""
    llama.all_reduce = lambda x, tp: x
    vocab_parallel.all_reduce = lambda x, tp: x
    vocab_parallel.all_gather_columns = lambda x, tp: x.repeat(1, tp.size)


@torch.inference_mode()
def step_seconds(tp: TensorParallel, batch: int, context: int, steps: int) -> float:
    folder = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    cfg = read_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"), tp=tp)
    per_request = context + 1
    shape = (cfg.num_hidden_layers, batch * per_request + 1, tp.local_kv_heads(cfg.num_key_value_heads), cfg.head_dim)
    kv = (torch.zeros(shape), torch.zeros(shape))
    table = (torch.arange(batch * per_request, dtype=torch.int32) + 1).view(batch, per_request)
    rows = list(range(batch))
    prefill = AttentionMetadata.build(table[:, :context].flatten().long(), table, rows, [context] * batch, [context] * batch)
    model(torch.randint(1000, 40000, (batch * context,)), torch.arange(context).repeat(batch), kv, prefill)
    decode = AttentionMetadata.build(table[:, context].long(), table, rows, [per_request] * batch, [1] * batch)
    ids, pos = torch.randint(1000, 40000, (batch,)), torch.full((batch,), context)
    times = []
    for _ in range(steps + 3):
        if tp.size > 1:
            dist.barrier(tp.group)
        t0 = time.perf_counter()
        model.compute_logits(model(ids, pos, kv, decode))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def collectives_seconds(tp: TensorParallel, batch: int, steps: int) -> float:
    cfg = read_config(resolve_checkpoint(None, Path.home() / ".cache" / "kiln"))
    x, logits = torch.randn(batch, cfg.hidden_size), torch.randn(batch, tp.vocab_rows(cfg.vocab_size))
    times = []
    for _ in range(steps + 3):
        dist.barrier(tp.group)
        t0 = time.perf_counter()
        for _ in range(2 * cfg.num_hidden_layers + 1):
            all_reduce(x, tp).sum()  # the sum waits for the collective
        all_gather_columns(logits, tp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:])


def _rank(rank: int, size: int, init: str, threads: int, mode: str, args: argparse.Namespace, out: str) -> None:
    """mode: "model" (decode steps), "stubbed" (decode steps, collectives stubbed) or "collectives" (those alone)."""
    torch.set_num_threads(threads)
    tp = TensorParallel()
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
        tp = TensorParallel(rank, size, dist.group.WORLD)
    if mode == "collectives":
        result = {b: collectives_seconds(tp, b, args.steps) for b in args.batch_sizes}
    else:
        if mode == "stubbed":
            _without_collectives()
        result = {b: step_seconds(tp, b, args.context, args.steps) for b in args.batch_sizes}
    if rank == 0:
        torch.save(result, out)
    if size > 1:
        dist.destroy_process_group()


def run(size: int, threads: int, mode: str, args: argparse.Namespace) -> dict[int, float]:
    folder = Path(tempfile.mkdtemp())
    mp.spawn(_rank, args=(size, str(folder / "init"), threads, mode, args, str(folder / "out")), nprocs=size)
    return torch.load(folder / "out")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kiln.bench.tp_overhead", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args(argv)
    settings = {
        "TP=1, 2 threads": (1, 2, "model"),
        "TP=1, 1 thread": (1, 1, "model"),
        "TP=2, 1 thread each": (2, 1, "model"),
        "TP=2, collectives stubbed": (2, 1, "stubbed"),
        "a step's collectives alone": (2, 1, "collectives"),
    }
    print(f"SmolLM2-135M float32 eager, decode at {args.context} tokens of context: ms per step (forward + logits)")
    for name, setting in settings.items():
        result = run(*setting, args)
        print(f"{name:28s}" + "".join(f"  batch {b}: {s * 1e3:7.1f}" for b, s in result.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
