"""BERT and XLM-RoBERTa encoders (bidirectional attention), plain and with a sequence-classification head.

Module names follow transformers' so checkpoint tensors load by name (after the `bert.` / `roberta.`
prefix). Requests are always computed whole (no prefix cache, no chunking): positions start at 0.
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.models.config import ModelConfig
from kiln.models.pooling import span_rows
from kiln.models.weights import copy_weight
from kiln.ops.attention import AttentionMetadata, attention
from kiln.ops.linear import Linear

ACTIVATIONS = {"gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int  # XLM-R counts positions from padding_idx + 1
    sep_token_id: int | None  # segment 1 starts after the first separator (sentence pairs)
    num_labels: int

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "EncoderConfig":
        raw = cfg.raw
        offset = raw.get("pad_token_id", 1) + 1 if cfg.model_type in ("xlm-roberta", "roberta") else 0
        return cls(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            max_positions=cfg.max_position_embeddings,
            type_vocab_size=raw.get("type_vocab_size", 2),
            layer_norm_eps=raw.get("layer_norm_eps", 1e-12),
            hidden_act=raw.get("hidden_act", "gelu"),
            position_offset=offset,
            sep_token_id=raw.get("sep_token_id"),
            num_labels=raw.get("num_labels") or len(raw.get("id2label") or (0, 1)),
        )


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def token_types(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """0 up to and including a request's first separator, 1 after it (what tokenizers give a text pair)."""
        if self.cfg.type_vocab_size < 2 or self.cfg.sep_token_id is None:
            return torch.zeros_like(input_ids)
        is_sep = (input_ids == self.cfg.sep_token_id).long()
        seps_before = is_sep.cumsum(0) - is_sep
        # A request's first row sits `positions` rows back, since its positions start at 0.
        first = torch.arange(input_ids.shape[0], device=input_ids.device) - positions
        return ((seps_before - seps_before[first]) > 0).long()

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.cfg.position_offset)
        x = x + self.token_type_embeddings(self.token_types(input_ids, positions))
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.self = SelfAttention(cfg)
        self.output = AttentionOutput(cfg)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        s = self.self
        shape = (-1, s.n_heads, s.head_dim)
        q, k, v = s.query(x).view(shape), s.key(x).view(shape), s.value(x).view(shape)
        o = attention(q, k, v, kv, self.layer, meta, s.head_dim**-0.5, causal=False)
        return self.output.LayerNorm(x + self.output.dense(o.view(x.shape)))


class Intermediate(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)


class Output(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dense = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Layer(nn.Module):
    """Post-norm block: attention, add, norm; feed-forward, add, norm."""

    def __init__(self, cfg: EncoderConfig, layer: int):
        super().__init__()
        self.attention = Attention(cfg, layer)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        x = self.attention(x, kv, meta)
        return self.output.LayerNorm(x + self.output.dense(self.act(self.intermediate.dense(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))


class BertModel(nn.Module):
    """The encoder alone: last hidden states of every token, for pooled embeddings."""

    checkpoint_prefixes = ("bert.", "roberta.")
    unused_weights = ("pooler.", "embeddings.position_ids", "lm_head.", "cls.")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_cfg = EncoderConfig.from_model_config(cfg)
        self.embeddings = Embeddings(self.enc_cfg)
        self.encoder = Encoder(self.enc_cfg)

    @property
    def max_tokens(self) -> int:
        """Longest input the position table covers."""
        return self.enc_cfg.max_positions - self.enc_cfg.position_offset

    def forward(self, input_ids: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        """Hidden states for every row: [T, hidden]."""
        x = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            x = layer(x, kv, meta)
        return x

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for prefix in self.checkpoint_prefixes:
                name = name.removeprefix(prefix)
            if name not in params:
                if name.startswith(self.unused_weights):
                    continue
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            copy_weight(params[name].data, tensor)
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


class BertPooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = Linear(hidden, hidden)

    def forward(self, cls: Tensor) -> Tensor:
        return torch.tanh(self.dense(cls))


class BertForSequenceClassification(BertModel):
    """Cross-encoder: the pooled first token through a linear classifier."""

    unused_weights = ("embeddings.position_ids",)

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.pooler = BertPooler(cfg.hidden_size)
        self.classifier = Linear(cfg.hidden_size, self.enc_cfg.num_labels)

    def classify(self, hidden: Tensor, lens: list[int]) -> Tensor:
        """[T, hidden] → [B, num_labels] float32 logits from each request's first token."""
        return self.classifier(self.pooler(hidden[span_rows(lens, "cls", hidden.device)])).float()


class XLMRobertaClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int):
        super().__init__()
        self.dense = Linear(hidden, hidden)
        self.out_proj = Linear(hidden, num_labels)

    def forward(self, cls: Tensor) -> Tensor:
        return self.out_proj(torch.tanh(self.dense(cls)))


class XLMRobertaForSequenceClassification(BertModel):
    """Cross-encoder (bge-reranker's architecture): the first token through dense, tanh, out_proj."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.classifier = XLMRobertaClassificationHead(cfg.hidden_size, self.enc_cfg.num_labels)

    def classify(self, hidden: Tensor, lens: list[int]) -> Tensor:
        return self.classifier(hidden[span_rows(lens, "cls", hidden.device)]).float()
