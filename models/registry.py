"""Maps a checkpoint's `architectures` entry to the Kiln module that implements it, and to the kind of model it is."""

from torch import nn

from kiln.models.bert import BertForSequenceClassification, BertModel, XLMRobertaForSequenceClassification
from kiln.models.config import ModelConfig
from kiln.models.gemma3 import Gemma3ForCausalLM
from kiln.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from kiln.models.llama_classifier import LlamaForSequenceClassification, Qwen2ForSequenceClassification
from kiln.models.llama_embedding import LlamaEmbeddingModel, Qwen2EmbeddingModel
from kiln.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "BertModel": BertModel,
    "XLMRobertaModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
    "LlamaModel": LlamaEmbeddingModel,
    "Qwen2Model": Qwen2EmbeddingModel,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
}

# What a loaded model answers: /generate, /encode (embeddings), /v1/rerank (cross-encoder), /classify (reward).
GENERATION, EMBEDDING, CROSS_ENCODER, REWARD = "generation", "embedding", "cross-encoder", "reward"
# --is-embedding serves a causal LM's checkpoint through its headless twin.
_AS_EMBEDDING = {LlamaForCausalLM: LlamaEmbeddingModel, Qwen2ForCausalLM: Qwen2EmbeddingModel}
_KINDS = {
    BertModel: EMBEDDING,
    LlamaEmbeddingModel: EMBEDDING,
    Qwen2EmbeddingModel: EMBEDDING,
    BertForSequenceClassification: CROSS_ENCODER,
    XLMRobertaForSequenceClassification: CROSS_ENCODER,
    LlamaForSequenceClassification: REWARD,
    Qwen2ForSequenceClassification: REWARD,
}


def model_class(cfg: ModelConfig, is_embedding: bool = False) -> type[nn.Module]:
    for arch in cfg.architectures:
        if arch in ARCHITECTURES:
            cls = ARCHITECTURES[arch]
            return _AS_EMBEDDING.get(cls, cls) if is_embedding else cls
    raise ValueError(
        f"architecture {cfg.architectures} is not supported; Kiln knows {sorted(ARCHITECTURES)}"
    )


def model_kind(cfg: ModelConfig, is_embedding: bool) -> str:
    """A decoder is a generation model unless served with --is-embedding (last-token embeddings, as gte-Qwen2)."""
    return _KINDS.get(model_class(cfg, is_embedding), GENERATION)
