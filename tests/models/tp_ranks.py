"""Greedy decoding driven by hand (no engine), on one process or on tensor-parallel ranks spawned over gloo.

Not a test module: `test_tensor_parallel.py` imports it, and the spawned ranks import it by name (pytest's
importlib mode leaves test modules unimportable from another process).
"""

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from kiln.compiler.cache import use_cache_dir
from kiln.compiler.compiled_model import CompiledModel
from kiln.compiler.profile import Profile
from kiln.models.loader import load_model, read_config
from kiln.ops.attention import AttentionMetadata
from kiln.ops.tensor_parallel import TensorParallel

SLOTS_PER_REQUEST = 64
TINY_PROMPTS = [[3, 17, 99, 5, 42, 7, 1, 64, 8, 126], [11, 12, 13, 120]]


def tiny_qwen2(folder: Path, kv_heads: int, tied: bool, layers: int = 2, head: type = Qwen2ForCausalLM) -> Path:
    """4 query heads, vocabulary 127 (the second rank's shard is padded), random q/k/v biases."""
    torch.manual_seed(kv_heads)
    cfg = Qwen2Config(
        vocab_size=127, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=tied,
    )  # fmt: skip
    hf = head(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf.save_pretrained(folder)
    return folder


# Qwen2-MoE: a shared expert (its own width, 48) and a dense middle layer; Qwen3-MoE: q/k norms, renormalised
# top-k, every other layer sparse. Each with 8 experts of width 32 (16 per rank).
TINY_MOE = {
    "qwen2-moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(shared_expert_intermediate_size=48, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(num_experts_per_tok=4, norm_topk_prob=True, head_dim=16, decoder_sparse_step=2)),
}  # fmt: skip


def tiny_moe(folder: Path, name: str) -> Path:
    """A 3-layer MoE of TINY_MOE with vocabulary 127 and decisive routing (router weights of std 0.5: a near
    tie between two experts would let the ranks' summation order flip a choice)."""
    config_cls, model_cls, extra = TINY_MOE[name]
    torch.manual_seed(2)  # seeds 0 and 1 give Qwen2-MoE greedy runs of one repeated token
    cfg = config_cls(
        vocab_size=127, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **extra,
    )  # fmt: skip
    hf = model_cls(cfg)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.normal_(1.0 if "norm" in pname else 0.0, 0.3)
            elif pname.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(folder)
    return folder


@dataclass
class Case:
    """One model to decode: a checkpoint folder (or a config folder with dummy_seed), and how to run it."""

    folder: Path
    prompts: list[list[int]]
    new_tokens: int
    dummy_seed: int | None = None
    is_embedding: bool = False  # served for its hidden states (--is-embedding), or a reward model's scores
    profile: str | None = None  # a TOML profile: run the piecewise-compiled model
    compile_cache: Path | None = None


@dataclass
class Result:
    tokens: list[list[int]]
    logits: Tensor  # [steps, requests, vocab] float32; for a pooled model, [1, prompt rows, hidden] or scores
    counters: dict[str, Any] = field(default_factory=dict)
    expert_counts: Tensor | None = None  # [MoE layers, experts]: tokens each layer routed to each expert


def greedy(case: Case, tp: TensorParallel = TensorParallel()) -> Result:
    """Prefills every prompt in one batch, then decodes them together, taking the argmax of the full logits."""
    cfg = read_config(case.folder)
    model = load_model(case.folder, cfg, torch.float32, torch.device("cpu"), case.is_embedding, case.dummy_seed, tp)
    n = len(case.prompts)
    shape = (cfg.num_hidden_layers, n * SLOTS_PER_REQUEST + 1, tp.local_kv_heads(cfg.num_key_value_heads), cfg.head_dim)
    kv = (torch.zeros(shape), torch.zeros(shape))
    table = (torch.arange(n * SLOTS_PER_REQUEST, dtype=torch.int32) + 1).view(n, SLOTS_PER_REQUEST)
    pooled = case.is_embedding or hasattr(model, "classify")
    forward = model
    if case.profile is not None:
        use_cache_dir(case.compile_cache)
        profile = Profile.load(_write(case.compile_cache / "profile.toml", case.profile))
        forward = CompiledModel(model, profile)
        forward.warm_up(kv, table, show_progress=False)

    @torch.inference_mode()  # as the model runner: Dynamo guards on the inputs' dispatch keys
    def step(ids: list[int], starts: list[int], news: list[int]) -> Tensor:
        slots = torch.cat([table[i, s : s + k] for i, (s, k) in enumerate(zip(starts, news))]).long()
        meta = AttentionMetadata.build(slots, table, list(range(n)), [s + k for s, k in zip(starts, news)], news)
        pos = torch.cat([torch.arange(s, s + k) for s, k in zip(starts, news)])
        hidden = forward(torch.tensor(ids), pos, kv, meta)
        if pooled:  # the prompts' hidden states, or a reward model's scores of them
            return model.classify(hidden, news) if hasattr(model, "classify") else hidden
        return model.compute_logits(hidden[torch.tensor(news).cumsum(0) - 1])  # each request's last row

    lens = [len(p) for p in case.prompts]
    logits = [step(sum(case.prompts, []), [0] * n, lens)]
    if pooled:
        return Result([], logits[0][None])
    tokens = [[int(t)] for t in logits[-1].argmax(-1)]
    for _ in range(case.new_tokens - 1):
        logits.append(step([t[-1] for t in tokens], [ln + len(t) - 1 for ln, t in zip(lens, tokens)], [1] * n))
        for t, nxt in zip(tokens, logits[-1].argmax(-1)):
            t.append(int(nxt))
    counters = forward.counters() if isinstance(forward, CompiledModel) else {}
    experts = [layer.mlp.expert_counts.clone() for layer in getattr(model, "layers", []) if hasattr(layer.mlp, "expert_counts")]
    return Result(tokens, torch.stack(logits), counters, torch.stack(experts) if experts else None)


def _write(path: Path, text: str) -> Path:
    """Writes through a file of this process's own and a rename: the ranks share the compile cache, and a
    rank reading while another truncates the file would see an empty profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    own = path.with_name(f"{path.name}.{os.getpid()}")
    own.write_text(text)
    os.replace(own, path)
    return path


def _rank(rank: int, size: int, init: str, cases: dict[str, Case], out: Path) -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's two cores
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    try:
        tp = TensorParallel(rank, size, dist.group.WORLD)
        torch.save({name: greedy(case, tp) for name, case in cases.items()}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def greedy_on_ranks(cases: dict[str, Case], size: int, out: Path) -> list[dict[str, Result]]:
    """Every case on `size` ranks (one process each, gloo); each rank's results."""
    init = Path(tempfile.mkdtemp()) / "init"
    mp.spawn(_rank, args=(size, str(init), cases, out), nprocs=size, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(size)]
