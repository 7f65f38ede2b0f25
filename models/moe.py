"""Mixture-of-experts decoders: Qwen2-MoE, Qwen3-MoE and Mixtral.

Each is Llama's block (attention, RMSNorm, rotary, fused q/k/v) with the MLP of some
or all layers replaced by a sparse MoE: a router picks `top_k` of E experts per
token, and the `kiln::moe` op runs them. Qwen2-MoE adds a dense shared expert whose
output a sigmoid gate scales; Qwen3-MoE normalises queries and keys per head and
may renormalise the top-k weights; Mixtral always renormalises them.

Checkpoints store one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1.weight`); Kiln stacks them into [E, 2I, H] and
[E, H, I] parameters named as transformers 5 names its fused experts.
"""

import torch
from torch import Tensor, nn

from kiln.models import llama
from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM, RMSNorm
from kiln.models.rope import RotaryEmbedding
from kiln.ops.attention import AttentionMetadata, attention
from kiln.ops.linear import Linear
from kiln.ops.moe import moe


def num_experts(cfg: ModelConfig) -> int:
    return cfg.raw.get("num_experts") or cfg.raw["num_local_experts"]


class Attention(llama.Attention):
    """Llama's attention, with Qwen3's per-head q/k RMSNorm and Mixtral's sliding window where the config has them."""

    def __init__(self, cfg: ModelConfig, layer: int, qk_norm: bool, sliding_window: int):
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.sliding_window = sliding_window

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(-1, self.n_heads, self.head_dim), k.view(-1, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, positions), rope(k, positions)
        v = v.view(-1, self.n_kv, self.head_dim)
        o = attention(q, k, v, kv, self.layer, meta, self.scale, sliding_window=self.sliding_window)
        return self.o_proj(o.view(-1, self.q_size))


class Experts(nn.Module):
    def __init__(self, count: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(count, hidden, intermediate))


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, renormalize: bool, shared_expert_size: int):
        super().__init__()
        count = num_experts(cfg)
        self.top_k, self.renormalize = cfg.raw["num_experts_per_tok"], renormalize
        self.gate = Linear(cfg.hidden_size, count, bias=False)  # the router
        self.experts = Experts(count, cfg.hidden_size, cfg.raw.get("moe_intermediate_size") or cfg.intermediate_size)
        # Tokens routed to each expert since the recorder last reset it; the op adds into it.
        self.register_buffer("expert_counts", torch.zeros(count, dtype=torch.int64), persistent=False)
        self.shared_expert = llama.MLP(cfg, intermediate_size=shared_expert_size) if shared_expert_size else None
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False) if shared_expert_size else None

    def forward(self, x: Tensor, num_tokens: Tensor) -> Tensor:
        e = self.experts
        out = moe(x, self.gate(x), e.gate_up_proj, e.down_proj, self.top_k, self.renormalize, num_tokens, self.expert_counts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, attn: Attention, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv, meta)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoE):
            # Rows past the requests' new tokens are bucket padding: the op neither runs nor counts them.
            return x + self.mlp(h, meta.extend_lens.sum())
        return x + self.mlp(h)


class MoEForCausalLM(LlamaForCausalLM):
    """The shared skeleton; subclasses say which layers are sparse and how routing normalises."""

    tensor_parallel = False  # experts are not sharded yet

    qk_norm = False

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self._layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def _layer(self, i: int) -> DecoderLayer:
        cfg = self.cfg
        attn = Attention(cfg, i, self.qk_norm, self.sliding_window())
        if self.is_sparse(i):
            mlp = SparseMoE(cfg, self.renormalize(), cfg.raw.get("shared_expert_intermediate_size") or 0)
        else:
            mlp = llama.MLP(cfg)
        return DecoderLayer(cfg, i, attn, mlp)

    def is_sparse(self, layer: int) -> bool:
        step = self.cfg.raw.get("decoder_sparse_step") or 1
        return layer not in (self.cfg.raw.get("mlp_only_layers") or []) and (layer + 1) % step == 0

    def renormalize(self) -> bool:
        return bool(self.cfg.raw.get("norm_topk_prob", False))

    def sliding_window(self) -> int:
        return 0

    def locate(self, name: str, params: dict[str, nn.Parameter]) -> tuple[str, str, Tensor]:
        parts = name.split(".")
        # layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight -> row block of the stacked expert tensors
        if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit():
            expert, proj, prefix = int(parts[-3]), parts[-2], ".".join(parts[:-3])
            if proj == "down_proj":
                target = f"{prefix}.down_proj"
                return target, str(expert), params[target].data[expert]
            target = f"{prefix}.gate_up_proj"
            if proj not in ("gate_proj", "up_proj") or target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            half = params[target].shape[1] // 2
            part = 0 if proj == "gate_proj" else 1
            return target, f"{expert}.{part}", params[target].data[expert, part * half : (part + 1) * half]
        return super().locate(name, params)

    def shards(self, name: str, param: Tensor) -> list[str]:
        if name.endswith("experts.gate_up_proj"):
            return [f"{e}.{p}" for e in range(param.shape[0]) for p in (0, 1)]
        if name.endswith("experts.down_proj"):
            return [str(e) for e in range(param.shape[0])]
        return super().shards(name, param)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    """Qwen2's attention (q/k/v biases) and a shared expert beside the routed ones."""


class Qwen3MoeForCausalLM(MoEForCausalLM):
    qk_norm = True


class MixtralForCausalLM(MoEForCausalLM):
    # Mixtral's checkpoint names: block_sparse_moe for mlp, w1/w3/w2 for gate/up/down.
    _renames = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def renormalize(self) -> bool:
        return True

    def sliding_window(self) -> int:
        return self.cfg.raw.get("sliding_window") or 0

    def checkpoint_name(self, name: str) -> str:
        parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
        if len(parts) >= 2 and parts[-2] in self._renames:
            parts[-2] = self._renames[parts[-2]]
        return ".".join(parts)
