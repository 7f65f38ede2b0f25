"""Tensor parallel on two CPU ranks (gloo): float32 greedy tokens and logits equal one rank's.

One spawn runs every case on both ranks (starting the ranks costs more than the small models); the
single-rank references run in the test process. The compiled case is tests/compiler/test_tensor_parallel.py.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2ForSequenceClassification

from kiln.models.loader import load_model, read_config, resolve_checkpoint
from kiln.ops.tensor_parallel import TensorParallel
from kiln.tests.models.tp_ranks import TINY_PROMPTS, Case, greedy, greedy_on_ranks, tiny_moe, tiny_qwen2

# Float32 logits of two ranks against one's: the row-parallel sums add in another order (SmolLM2 measured
# 9e-5 at most over 12 tokens; the tiny models 2e-7).
ATOL = {"smollm2": 3e-4}
TINY_ATOL = 2e-6


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("tp")
    smollm2 = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    tok = AutoTokenizer.from_pretrained(smollm2)
    real = [tok(t).input_ids for t in ("The capital of France is", "Three prime numbers are")]
    kv2, kv1 = tiny_qwen2(root / "kv2", 2, tied=False), tiny_qwen2(root / "kv1", 1, tied=True)
    return {
        # 9 query heads and 3 KV heads: ranks hold 2 and 1 GQA groups.
        "smollm2": Case(smollm2, real, 12),
        "qwen2-kv2": Case(kv2, TINY_PROMPTS, 12),
        "qwen2-kv1": Case(kv1, TINY_PROMPTS, 12),  # the KV head replicated on both ranks
        "dummy": Case(kv2, TINY_PROMPTS, 12, dummy_seed=7),
        "embedding": Case(kv2, TINY_PROMPTS, 0, is_embedding=True),  # every prompt row's hidden state
        "reward": Case(tiny_qwen2(root / "reward", 2, tied=False, head=Qwen2ForSequenceClassification), TINY_PROMPTS, 0),
        "qwen2-moe": Case(tiny_moe(root / "qwen2-moe", "qwen2-moe"), TINY_PROMPTS, 8),
        "qwen3-moe": Case(tiny_moe(root / "qwen3-moe", "qwen3-moe"), TINY_PROMPTS, 8),
        "moe-dummy": Case(root / "qwen2-moe", TINY_PROMPTS, 8, dummy_seed=7),
    }


@pytest.fixture(scope="module")
def ranks(cases, tmp_path_factory):
    return greedy_on_ranks(cases, 2, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize(
    "name", ["smollm2", "qwen2-kv2", "qwen2-kv1", "dummy", "embedding", "reward", "qwen2-moe", "qwen3-moe", "moe-dummy"]
)
def test_two_ranks_give_one_ranks_tokens(cases, ranks, name):
    one = greedy(cases[name])
    two = ranks[0][name]
    assert two.tokens == one.tokens
    torch.testing.assert_close(two.logits, one.logits, atol=ATOL.get(name, TINY_ATOL), rtol=1e-5)
    # Every rank holds the full logits after the all-gather, bit for bit.
    assert torch.equal(ranks[1][name].logits, two.logits)
    # The router is whole on every rank: each rank's expert counts (rank 0's are the recorder's) are one rank's.
    if "moe" in name:
        assert all(torch.equal(rank[name].expert_counts, one.expert_counts) for rank in ranks)


TINY_CONFIG = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 2,
}  # fmt: skip


def _load_on_rank_0_of_2(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))
    load_model(folder, read_config(folder), torch.float32, torch.device("cpu"), dummy_seed=0, tp=TensorParallel(0, 2))


def test_models_without_tensor_parallel_refuse_it(tmp_path):
    config = {**TINY_CONFIG, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 16}
    with pytest.raises(ValueError, match="Gemma3ForCausalLM cannot run tensor-parallel"):
        _load_on_rank_0_of_2(tmp_path, config)


def test_experts_that_do_not_split_evenly_are_refused(tmp_path):
    config = {
        **TINY_CONFIG, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 33,
    }  # fmt: skip
    with pytest.raises(ValueError, match="intermediate size 33 does not split evenly over 2 tensor-parallel ranks"):
        _load_on_rank_0_of_2(tmp_path, config)
