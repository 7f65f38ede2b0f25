"""Kiln's Qwen2-MoE, Qwen3-MoE and Mixtral against transformers' own forward, on tiny random checkpoints:
logits, the router's choices (the expert counts), and greedy tokens through the engine."""

import pytest
import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from kiln.models.config import ModelConfig
from kiln.models.loader import load_model, read_config
from kiln.models.moe import num_experts
from kiln.ops.attention import AttentionMetadata
from kiln.serving.engine.core import EngineCore
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
CASES = {
    # A shared expert, and a dense middle layer (mlp_only_layers).
    "qwen2-moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
    )),
    # q/k norms, renormalised top-k, every other layer sparse.
    "qwen3-moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=True, head_dim=16, decoder_sparse_step=2,
    )),
    # A sliding window the longer prompt outgrows.
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=6)),
}  # fmt: skip
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # float32 throughout


def build(name: str, folder):
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**TINY, **extra)).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.normal_(1.0 if "norm" in pname else 0.0, 0.3)  # so that a dropped bias or norm shows
            elif pname.endswith(("gate.weight", "router.weight")):
                p.normal_(0.0, 0.5)  # decisive routing: the default init leaves the experts' weights near-equal
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(params=list(CASES))
def checkpoint(request, tmp_path):
    return tmp_path, build(request.param, tmp_path)


def hf_expert_counts(hf, prompts: list[list[int]], layers: int, experts: int) -> torch.Tensor:
    """[layers, experts]: how often transformers' router picks each expert over these tokens (dense layers: 0)."""
    top_k = hf.config.num_experts_per_tok
    sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    counts = torch.zeros(layers, experts, dtype=torch.int64)
    for ids in prompts:
        with torch.no_grad():
            router_logits = hf(torch.tensor([ids]), output_router_logits=True).router_logits
        for layer, logits in zip(sparse, router_logits, strict=True):
            counts[layer] += torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=experts)
    return counts


def kiln_expert_counts(model, layers: int) -> torch.Tensor:
    counts = torch.zeros(layers, num_experts(model.cfg), dtype=torch.int64)
    for i, layer in enumerate(model.layers):
        if hasattr(layer.mlp, "expert_counts"):
            counts[i] = layer.mlp.expert_counts
    return counts


def test_logits_and_routing_match_transformers(checkpoint, kv_pool):
    folder, hf = checkpoint
    cfg = read_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    prompts = [[3, 17, 99, 5, 42, 7, 1, 64, 8, 77, 21], [11, 12, 13, 120]]
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]

    # Both prompts but their last two tokens in one batch, with 5 padding rows after them (as a bucket pads)...
    pool = kv_pool(cfg, 2)
    heads = [p[:-2] for p in prompts]
    real = sum(len(h) for h in heads)
    meta = pool.meta([0, 1], [0, 0], [len(h) for h in heads])
    meta.out_slots = torch.cat([meta.out_slots, torch.zeros(5, dtype=torch.int64)])  # padding writes scratch slot 0
    ids = torch.tensor(sum(heads, []) + [0] * 5)
    pos = torch.cat([torch.arange(len(h)) for h in heads] + [torch.zeros(5, dtype=torch.int64)])
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, pool.kv, meta))
    torch.testing.assert_close(logits[: len(heads[0])], refs[0][: len(heads[0])], **TOLERANCE)
    torch.testing.assert_close(logits[len(heads[0]) : real], refs[1][: len(heads[1])], **TOLERANCE)

    # ...then one decode step for both requests at a time over the cached prefix.
    for back in (2, 1):
        logits = pool.decode_logits(model, prompts, back)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i], refs[i][len(p) - back], **TOLERANCE)

    # Every real token went through the router once, padding never: the counts are transformers' top-k, exactly.
    layers = cfg.num_hidden_layers
    assert torch.equal(kiln_expert_counts(model, layers), hf_expert_counts(hf, prompts, layers, num_experts(cfg)))


def test_config_reads_each_checkpoints_expert_fields():
    base = dict(TINY, intermediate_size=96, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts_per_tok=2)
    hub = ModelConfig.from_dict({**base, "num_experts": 128, "moe_intermediate_size": 32})  # as Qwen3-30B-A3B's config.json
    transformers5 = ModelConfig.from_dict({**base, "num_local_experts": 128})
    assert num_experts(hub) == num_experts(transformers5) == 128
    # Qwen2-MoE has q/k/v biases whether or not its config says qkv_bias.
    qwen2 = dict(base, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=8)
    assert ModelConfig.from_dict(qwen2).attention_bias and not ModelConfig.from_dict({**qwen2, "qkv_bias": False}).attention_bias


def test_a_checkpoint_missing_an_expert_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    build("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"lacks 1 tensors.*layers\.1\.mlp\.experts\.gate_up_proj#5\.1"):
        load_model(tmp_path, read_config(tmp_path), torch.float32, torch.device("cpu"))


def drive(core: EngineCore, waves: list[list[tuple[str, list[int]]]], new_tokens: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for wave in waves:
        for rid, ids in wave:
            core.add(GenerateRequest(rid, ids, SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)))
        while core.has_work:
            for o in core.step():
                out.setdefault(o.rid, []).extend(o.new_ids)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_tokens_match_transformers_batched_and_alone(name, tmp_path):
    hf = build(name, tmp_path)
    core = EngineCore(ServerArgs(model_path=str(tmp_path), skip_tokenizer_init=True, dtype="float32", max_total_tokens=1024, disable_compile=True))
    gen = torch.Generator().manual_seed(1)
    prompts = {f"p{i}": torch.randint(1, 128, (n,), generator=gen).tolist() for i, n in enumerate((4, 11, 30))}
    steps = 40
    want = {}
    for rid, ids in prompts.items():
        seq = list(ids)
        with torch.no_grad():
            for _ in range(steps):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
        want[rid] = seq[len(ids) :]
    assert drive(core, [list(prompts.items())], steps) == want
    core.flush_cache()
    assert drive(core, [[(rid, ids)] for rid, ids in prompts.items()], steps) == want
