"""Each tensor-parallel rank's weights are its slice of the single-rank model's, loaded without collectives:
the GGUF's Q4_1 projections (rows for q/k/v and gate/up, whole 32-input blocks for o and down) and the
vocabulary-parallel LM head (int8 rows). Bfloat16 activations, int4's fast CPU path (float32's is 60x slower)."""

from pathlib import Path

import pytest
import torch
from torch import Tensor

from kiln.models.gguf_q4 import GGUFQ4_1
from kiln.models.loader import default_model_path, load_model, quantize_model, read_config, resolve_checkpoint
from kiln.ops.quant_linear import Int4Linear, Int8Linear
from kiln.ops.tensor_parallel import TensorParallel

PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def weight(layer: torch.nn.Module) -> Tensor:
    """A linear layer's de-quantized [out, in] weight, read through its own kernel (exact: one term per sum)."""
    return layer(torch.eye(layer.in_features, dtype=torch.bfloat16)).T


def expected_shard(whole: Tensor, model: torch.nn.Module, module: str) -> Tensor:
    """The rows (fused parts split, each narrowed, joined again) or inputs of `whole` that `model`'s rank holds."""
    prefix, _, fused = module.rpartition(".")
    cfg = model.cfg
    if fused in PARTS:
        kv = cfg.num_key_value_heads * cfg.head_dim
        sizes = [cfg.num_attention_heads * cfg.head_dim, kv, kv] if fused == "qkv_proj" else [whole.shape[0] // 2] * 2
        pieces = whole.split(sizes)
        return torch.cat([read(p, model, f"{prefix}.{name}.weight") for p, name in zip(pieces, PARTS[fused])])
    return read(whole, model, f"{module}.weight")


def read(whole: Tensor, model: torch.nn.Module, name: str) -> Tensor:
    shard = model.shard_of(name)
    return whole.narrow(shard.dim, shard.start, shard.length)


@pytest.fixture(scope="module")
def models():
    folder = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    cfg, gguf = read_config(folder), GGUFQ4_1(default_model_path())
    out = []
    for tp in (TensorParallel(), TensorParallel(0, 2), TensorParallel(1, 2)):
        model = load_model(folder, cfg, torch.bfloat16, torch.device("cpu"), tp=tp)
        out.append((model, quantize_model(model, cfg, "int4wo-32", torch.bfloat16, gguf, tp)))
    return out


def test_gguf_q4_1_shards_are_slices_of_the_whole_layers(models):
    (whole, formats), *ranks = models
    for model, rank_formats in ranks:
        assert rank_formats == formats  # every projection of every rank came straight from the GGUF's blocks
        for module in ("layers.0.self_attn.qkv_proj", "layers.0.self_attn.o_proj", "layers.29.mlp.gate_up_proj", "layers.29.mlp.down_proj"):
            layer = model.get_submodule(module)
            assert isinstance(layer, Int4Linear)
            torch.testing.assert_close(weight(layer), expected_shard(weight(whole.get_submodule(module)), model, module), atol=0, rtol=0)


def test_lm_head_rows_split_over_ranks(models):
    (whole, _), (first, _), (second, _) = models
    heads = [m.lm_head for m in (whole, first, second)]
    assert all(isinstance(h, Int8Linear) for h in heads)
    assert torch.equal(torch.cat([heads[1].weight_int8, heads[2].weight_int8]), heads[0].weight_int8)
    assert torch.equal(torch.cat([heads[1].scales, heads[2].scales]), heads[0].scales)
