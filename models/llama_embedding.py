"""Llama and Qwen2 decoders as embedding models (gte-Qwen2 style): hidden states only, pooled by the engine."""

from collections.abc import Iterable

from torch import Tensor

from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM
from kiln.ops.tensor_parallel import TensorParallel


class LlamaEmbeddingModel(LlamaForCausalLM):
    """The decoder without its LM head; a checkpoint's lm_head, if any, is skipped."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__(cfg, tp)
        del self.lm_head

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        super().load_weights((name, t) for name, t in weights if not name.startswith("lm_head."))


class Qwen2EmbeddingModel(LlamaEmbeddingModel):
    """Qwen2's q/k/v biases come from ModelConfig (model_type qwen2)."""
