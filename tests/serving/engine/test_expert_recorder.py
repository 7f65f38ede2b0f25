"""The expert distribution recorder on a model without experts: refused at start-up, as SGLang refuses it."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.serving.engine.core import EngineCore
from kiln.serving.server_args import ServerArgs


def test_recording_a_dense_model_is_refused_at_start_up(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    args = ServerArgs(model_path=str(tmp_path), skip_tokenizer_init=True, disable_compile=True, max_total_tokens=128, expert_distribution_recorder_mode="stat")
    with pytest.raises(ValueError, match="needs a mixture-of-experts model; LlamaForCausalLM has no experts"):
        EngineCore(args)
