"""Llama and Qwen2 with a sequence-classification head (reward models): the last token's hidden state → scores."""

from torch import Tensor

from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM
from kiln.models.pooling import span_rows
from kiln.ops.linear import Linear
from kiln.ops.tensor_parallel import TensorParallel


class LlamaForSequenceClassification(LlamaForCausalLM):
    """The decoder with `score` in place of the LM head (whole on every tensor-parallel rank, as the hidden state is)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__(cfg, tp)
        del self.lm_head
        num_labels = cfg.raw.get("num_labels") or len(cfg.raw.get("id2label") or (0, 1))
        self.score = Linear(cfg.hidden_size, num_labels, bias=False)

    def classify(self, hidden: Tensor, lens: list[int]) -> Tensor:
        """[T, hidden] → [B, num_labels] float32 scores from each request's last token."""
        return self.score(hidden[span_rows(lens, "last", hidden.device)]).float()


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    """Qwen2's q/k/v biases come from ModelConfig (model_type qwen2)."""
