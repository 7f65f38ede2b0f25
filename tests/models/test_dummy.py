"""--load-format dummy: a model from a config alone, with seeded random weights, and the shipped configs."""

import json
from pathlib import Path

import pytest
import torch

from kiln.models.dummy import SHIPPED_CONFIGS, dummy_config_folder, has_tokenizer
from kiln.models.llama import LlamaForCausalLM, RMSNorm
from kiln.models.loader import load_model, read_config
from kiln.models.weights import ModelNotFoundError

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "attention_bias": True,
}  # fmt: skip


def tiny_config(folder: Path, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY | extra))
    return folder


def build(folder: Path, seed: int) -> torch.nn.Module:
    return load_model(folder, read_config(folder), torch.float32, torch.device("cpu"), dummy_seed=seed)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    folder = tiny_config(tmp_path)
    a, b, c = build(folder, 3).state_dict(), build(folder, 3).state_dict(), build(folder, 4).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    matrices = [k for k in a if a[k].dim() == 2]
    assert matrices and all(not torch.equal(a[k], c[k]) for k in matrices)


def test_weights_are_small_finite_with_identity_norms_and_zero_biases(tmp_path, kv_pool):
    model = build(tiny_config(tmp_path), 0)
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and all(torch.all(w == 1) for w in norms)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(torch.all(b == 0) for b in biases)
    weight = model.layers[0].mlp.gate_up_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002 and abs(weight.mean().item()) < 0.002
    cfg = read_config(tmp_path)
    pool = kv_pool(cfg, 1)
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor([5, 9, 13]), torch.arange(3), pool.kv, pool.meta([0], [0], [3])))
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_tied_embeddings_stay_tied(tmp_path):
    model = build(tiny_config(tmp_path, tie_word_embeddings=True), 0)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_a_config_name_resolves_to_the_shipped_folder(tmp_path):
    assert dummy_config_folder("llama-3.1-8b") == SHIPPED_CONFIGS / "llama-3.1-8b"
    assert dummy_config_folder(str(tiny_config(tmp_path))) == tmp_path
    assert not has_tokenizer(tmp_path)
    for missing in (str(tmp_path / "nothing-here"), "llama-9b", None):
        with pytest.raises(ModelNotFoundError, match="llama-3.1-8b"):  # the message lists the shipped names
            dummy_config_folder(missing)


def test_the_8b_config_has_llama_3_1_8b_shapes():
    cfg = read_config(dummy_config_folder("llama-3.1-8b"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (4096, 32, 32, 8)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim, cfg.max_position_embeddings) == (14336, 128256, 128, 131072)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5 and not cfg.tie_word_embeddings
    assert cfg.rope_scaling == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert cfg.eos_token_ids == [128001, 128009] and cfg.raw["bos_token_id"] == 128000
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
