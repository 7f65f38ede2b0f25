"""CUDA decode speed: Kiln eager, compiled, and compiled + CUDA graphs, against transformers, in one run.

    python -m kiln.bench.gpu_decode [--model-path DIR] [--dtype bfloat16] [--steps 128] [--batches 1 8 32]

Without --model-path it builds a random-weight model of SmolLM2-135M's shape
(decode speed does not depend on the weights' values). Each Kiln mode runs the
engine's per-step work: build the batch metadata on the host, run the model,
compute logits, pick the greedy token and read it back. Batch B decodes B
requests of --prompt-len tokens each; tok/s counts all B requests' tokens.
transformers runs `generate` (greedy, dynamic cache) on the same prompts.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from kiln.compiler.compiled_model import CompiledModel
from kiln.compiler.profile import Profile
from kiln.models.loader import load_model, read_config
from kiln.ops.attention import AttentionMetadata
from kiln.serving.engine.kv_pool import KVPool

SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

PROFILE = """
[buckets]
decode_batch_sizes = [2, 8, 32]
prefill_token_counts = [64, 256, 1024]
chunked_prefill_size = 1024
piece_graph_max_tokens = 1024

[inductor]
max_autotune = false
"triton.cudagraphs" = false
"""


def random_smollm2(folder: Path, dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(dtype).save_pretrained(folder)
    return folder


class DecodeLoop:
    """Prefills B prompts in one batch, then decodes them greedily one token per request per step."""

    def __init__(self, model: nn.Module, cfg, dtype: torch.dtype, max_batch: int, max_context: int, device: str = "cuda"):
        self.model = model
        self.device = device
        self.prefill_seconds = 0.0
        self.pool = KVPool(
            max_batch * max_context, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
            dtype, torch.device(device), max_batch, max_context,
        )  # fmt: skip
        for _ in range(max_batch):
            self.pool.alloc_slots(self.pool.alloc_row(), 0, max_context)

    def _step(self, forward, ids: Tensor, rows: list[int], starts: list[int], news: list[int]) -> Tensor:
        slots = torch.cat([self.pool.req_to_token[r, s : s + n] for r, s, n in zip(rows, starts, news)])
        positions = torch.tensor([p for s, n in zip(starts, news) for p in range(s, s + n)], device=self.device)
        meta = AttentionMetadata.build(slots, self.pool.req_to_token, rows, [s + n for s, n in zip(starts, news)], news)
        hidden = forward(ids, positions, (self.pool.k, self.pool.v), meta)
        last = torch.tensor(news, device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[last]).argmax(-1)

    @torch.inference_mode()
    def run(self, forward, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], float]:
        """Greedy tokens per request, and seconds per decode step (prefill excluded; its time
        is left in `prefill_seconds`)."""
        rows = list(range(len(prompts)))
        lens = [len(p) for p in prompts]
        t0 = time.perf_counter()
        ids = torch.tensor([t for p in prompts for t in p], device=self.device)
        nxt = self._step(forward, ids, rows, [0] * len(rows), lens)
        out = [nxt.tolist()]
        self.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            nxt = self._step(forward, nxt, rows, lens, [1] * len(rows))
            lens = [n + 1 for n in lens]
            out.append(nxt.tolist())  # the engine reads every token back to the host
        per_step = (time.perf_counter() - t0) / max(steps - 1, 1)
        return [list(col) for col in zip(*out)], per_step


def hf_decode(folder: Path, dtype: torch.dtype, prompts: list[list[int]], steps: int) -> float:
    """transformers' generate: decode seconds per step, from a 1-token and a full run."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)
    return (timed(steps) - timed(1)) / (steps - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.model_path) if args.model_path else random_smollm2(Path(tmp.name), dtype)
    cfg = read_config(folder)
    model = load_model(folder, cfg, dtype, torch.device("cuda"))
    loop = DecodeLoop(model, cfg, dtype, max(args.batches), args.prompt_len + args.steps + 1)

    profile_file = Path(tmp.name) / "profile.toml"
    profile_file.write_text(PROFILE)
    t0 = time.perf_counter()
    compiled = CompiledModel(model, Profile.load(profile_file))
    compiled.warm_up((loop.pool.k, loop.pool.v), loop.pool.req_to_token, show_progress=False)
    compile_s = time.perf_counter() - t0
    graphs, piece_sizes = compiled.graphs, compiled.stats.graph_sizes

    g = torch.Generator().manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "steps": args.steps, "compile_seconds": round(compile_s, 1), "rows": []}
    print(f"{results['device']}, {args.dtype}, warm-up (compile + graph capture) {compile_s:.1f}s, graphs {compiled.counters()['cuda_graph_memory_mb']} MB")
    print(f"{'batch':>5} {'mode':>18} {'ms/step':>8} {'tok/s':>9} {'vs eager':>8} {'prefill ms':>10}")
    for batch in args.batches:
        prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        timings, tokens, prefill = {}, {}, {}
        for mode in ("eager", "compiled", "compiled+graphs"):
            on = mode == "compiled+graphs"
            compiled.graphs, compiled.stats.graph_sizes = (graphs, piece_sizes) if on else (None, frozenset())
            forward = model if mode == "eager" else compiled
            loop.run(forward, prompts, 8)  # warm
            tokens[mode], timings[mode] = loop.run(forward, prompts, args.steps)
            prefill[mode] = loop.prefill_seconds
        timings["transformers"] = hf_decode(folder, dtype, prompts, min(args.steps, 64))
        for mode, s in timings.items():
            row = {"batch": batch, "mode": mode, "ms_per_step": round(s * 1e3, 3), "tok_s": round(batch / s, 1), "vs_eager": round(timings["eager"] / s, 2)}
            if mode in prefill:
                row["prefill_ms"] = round(prefill[mode] * 1e3, 2)
            results["rows"].append(row)
            print(f"{batch:>5} {mode:>18} {row['ms_per_step']:>8} {row['tok_s']:>9} {row['vs_eager']:>7}x {row.get('prefill_ms', ''):>10}")
        same = sum(a == b for a, b in zip(sum(tokens["eager"], []), sum(tokens["compiled+graphs"], [])))
        total = batch * args.steps
        results["rows"].append({"batch": batch, "greedy_tokens_equal_eager_vs_graphs": f"{same}/{total}"})
        print(f"      greedy tokens equal, eager vs compiled+graphs: {same}/{total}")
    compiled.graphs, compiled.stats.graph_sizes = graphs, piece_sizes
    print(json.dumps(compiled.counters()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
