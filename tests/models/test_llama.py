"""Kiln's Llama and Qwen2 against transformers' own forward, on tiny random checkpoints."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kiln.models.loader import load_model, read_config

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip

CASES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_theta=10000.0)),
    "llama3-rope-scaling": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        ),
    ),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, dict(rope_theta=1000000.0)),
}


@pytest.fixture(params=list(CASES))
def checkpoint(request, tmp_path):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**TINY, **extra)).eval()
    with torch.no_grad():  # random biases, so that a dropped bias shows up
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    hf.save_pretrained(tmp_path)
    return tmp_path, hf


def test_logits_match_transformers(checkpoint, kv_pool):
    folder, hf = checkpoint
    cfg = read_config(folder)
    model = load_model(folder, cfg, torch.float32, torch.device("cpu"))
    prompts = [[3, 17, 99, 5, 42, 7, 1, 64, 8], [11, 12, 13, 120]]
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0] for p in prompts]

    # Both prompts prefilled in one batch, all but their last two tokens...
    pool = kv_pool(cfg, 2)
    heads = [p[:-2] for p in prompts]
    ids = torch.tensor(sum(heads, []))
    pos = torch.cat([torch.arange(len(h)) for h in heads])
    with torch.no_grad():
        hidden = model(ids, pos, pool.kv, pool.meta([0, 1], [0, 0], [len(h) for h in heads]))
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits[: len(heads[0])], refs[0][: len(heads[0])], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[len(heads[0]) :], refs[1][: len(heads[1])], atol=1e-4, rtol=1e-4)

    # ...then one decode step per request at a time over the cached prefix.
    for back in (2, 1):
        logits = pool.decode_logits(model, prompts, back)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(logits[i], refs[i][len(p) - back], atol=1e-4, rtol=1e-4)


def test_config_reads_both_rope_layouts():
    from kiln.models.config import ModelConfig

    base = dict(TINY, architectures=["LlamaForCausalLM"], model_type="llama")
    old = ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["factor"] == new.rope_scaling["factor"] == 8.0
    plain = ModelConfig.from_dict({**base, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4
