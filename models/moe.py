"""Mixture-of-experts decoders: Qwen2-MoE, Qwen3-MoE and Mixtral.

Each is Llama's block (attention, RMSNorm, rotary, fused q/k/v) with the MLP of some
or all layers replaced by a sparse MoE: a router picks `top_k` of E experts per
token, and the `kiln::moe` op runs them. Qwen2-MoE adds a dense shared expert whose
output a sigmoid gate scales; Qwen3-MoE normalises queries and keys per head and
may renormalise the top-k weights; Mixtral always renormalises them.

Checkpoints store one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.{e}.w1.weight`); Kiln stacks them into [E, 2I, H] and
[E, H, I] parameters named as transformers 5 names its fused experts.

Tensor parallel (`tp`): attention and the dense layers shard as Llama's; each expert's intermediate dimension
splits over the ranks as the dense MLP's does (gate/up rows, down columns), while the router and its top-k stay
whole on every rank, so every rank routes each token alike. The routed experts' and the shared expert's
partial outputs are summed, and then all-reduced once.
"""

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from kiln.models import llama
from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM, RMSNorm
from kiln.models.rope import RotaryEmbedding
from kiln.models.weights import Shard
from kiln.ops.attention import AttentionMetadata, attention
from kiln.ops.collectives import all_reduce
from kiln.ops.linear import Linear
from kiln.ops.moe import moe
from kiln.ops.tensor_parallel import TensorParallel
from kiln.ops.vocab_parallel import VocabParallelEmbedding


def num_experts(cfg: ModelConfig) -> int:
    return cfg.raw.get("num_experts") or cfg.raw["num_local_experts"]


def expert_intermediate_size(cfg: ModelConfig) -> int:
    return cfg.raw.get("moe_intermediate_size") or cfg.intermediate_size


def expert_width(cfg: ModelConfig, tp: TensorParallel) -> range:
    """This rank's share of every routed expert's intermediate dimension: equal on every rank, so that the
    stacked expert tensors have one shape everywhere."""
    size = expert_intermediate_size(cfg)
    if size % tp.size:
        raise ValueError(f"the experts' intermediate size {size} does not split evenly over {tp.size} tensor-parallel ranks")
    return tp.split(size)


class Attention(llama.Attention):
    """Llama's attention, with Qwen3's per-head q/k RMSNorm and Mixtral's sliding window where the config has them."""

    def __init__(self, cfg: ModelConfig, layer: int, qk_norm: bool, sliding_window: int, tp: TensorParallel):
        super().__init__(cfg, layer, tp)
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
        return all_reduce(self.o_proj(o.view(-1, self.q_size)), self.tp)


class Experts(nn.Module):
    def __init__(self, count: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(count, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(count, hidden, intermediate))


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, renormalize: bool, shared_expert_size: int, tp: TensorParallel):
        super().__init__()
        count = num_experts(cfg)
        self.top_k, self.renormalize, self.tp = cfg.raw["num_experts_per_tok"], renormalize, tp
        self.gate = Linear(cfg.hidden_size, count, bias=False)  # the router, whole on every rank
        self.experts = Experts(count, cfg.hidden_size, len(expert_width(cfg, tp)))
        # Tokens routed to each expert since the recorder last reset it; the op adds into it.
        self.register_buffer("expert_counts", torch.zeros(count, dtype=torch.int64), persistent=False)
        self.shared_expert = llama.MLP(cfg, intermediate_size=shared_expert_size, tp=tp) if shared_expert_size else None
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False) if shared_expert_size else None

    def forward(self, x: Tensor, num_tokens: Tensor) -> Tensor:
        e = self.experts
        out = moe(x, self.gate(x), e.gate_up_proj, e.down_proj, self.top_k, self.renormalize, num_tokens, self.expert_counts)
        if self.shared_expert is not None:
            # The gate is one scalar per token, so scaling each rank's partial sum scales the whole.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert.partial(x)
        return all_reduce(out, self.tp)


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

    qk_norm = False

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = TensorParallel()):
        nn.Module.__init__(self)
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(self._layer(i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, tp.vocab_rows(cfg.vocab_size), bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def _layer(self, i: int) -> DecoderLayer:
        cfg, tp = self.cfg, self.tp
        attn = Attention(cfg, i, self.qk_norm, self.sliding_window(), tp)
        if self.is_sparse(i):
            mlp = SparseMoE(cfg, self.renormalize(), self.shared_expert_size(), tp)
        else:
            mlp = llama.MLP(cfg, tp=tp)
        return DecoderLayer(cfg, i, attn, mlp)

    def is_sparse(self, layer: int) -> bool:
        step = self.cfg.raw.get("decoder_sparse_step") or 1
        return layer not in (self.cfg.raw.get("mlp_only_layers") or []) and (layer + 1) % step == 0

    def shared_expert_size(self) -> int:
        return self.cfg.raw.get("shared_expert_intermediate_size") or 0

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

    def shard_of(self, name: str) -> Shard | None:
        """Llama's, but with each MLP's own width: a routed expert's, the shared expert's, a dense layer's."""
        parts = name.split(".")
        if self.tp.size == 1 or len(parts) < 3 or parts[-2] not in ("gate_proj", "up_proj", "down_proj"):
            return super().shard_of(name)
        if "experts" in parts:
            width = expert_width(self.cfg, self.tp)
        else:
            width = self.tp.split(self.shared_expert_size() if "shared_expert" in parts else self.cfg.intermediate_size)
        return Shard(1 if parts[-2] == "down_proj" else 0, width.start, len(width))

    def checkpoint_tensors(self, name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
        """Llama's, with the stacked experts split back into one checkpoint tensor per expert and projection."""
        prefix, _, param = name.rpartition(".")
        if not prefix.endswith(".experts"):
            yield from super().checkpoint_tensors(name, tensor)
            return
        for e, weights in enumerate(tensor):
            if param == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", weights
            else:
                gate, up = weights.chunk(2)
                yield from ((f"{prefix}.{e}.gate_proj.weight", gate), (f"{prefix}.{e}.up_proj.weight", up))

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
