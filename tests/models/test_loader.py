"""Finding checkpoints: folders, sharded safetensors, GGUF conversion, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.models.loader import ModelNotFoundError, iter_weights, load_model, read_config, resolve_checkpoint


def test_missing_local_path_names_it(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_checkpoint(str(tmp_path / "no-such-model"), tmp_path)


def test_unreachable_hub_id_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="kiln-test/definitely-missing"):
        resolve_checkpoint("kiln-test/definitely-missing", tmp_path)


def test_sharded_checkpoint_with_index_loads_every_tensor(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert sorted(n for n, _ in iter_weights(tmp_path)) == names
    model = load_model(tmp_path, read_config(tmp_path), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(model.layers[1].mlp.down_proj.weight, state["model.layers.1.mlp.down_proj.weight"])


def test_default_model_is_the_packaged_gguf_converted_once():
    cache = Path.home() / ".cache" / "kiln"
    first = resolve_checkpoint(None, cache)
    assert (first / "model.safetensors").exists() and (first / "config.json").exists()
    assert resolve_checkpoint(None, cache) == first  # the second start reuses the conversion
    assert read_config(first).architectures == ["LlamaForCausalLM"]
