"""Llama-family decoder (Llama 2/3, SmolLM2; Qwen2 adds q/k/v biases).

Tensor parallel (`tp`): q/k/v and gate/up are column-parallel (each rank holds its heads' rows and its share of
the MLP width, still fused), o and down are row-parallel and all-reduced (neither has a bias, so nothing is
added once per rank), and the embedding and LM head are vocabulary-parallel (`ops/vocab_parallel.py`).
Every rank's forward returns the full hidden state and `compute_logits` the full logits. Each rank reads only
its slice of every checkpoint tensor (`shard_of`).
"""

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.models.config import ModelConfig
from kiln.models.rope import RotaryEmbedding
from kiln.models.weights import Shard, copy_weight, read_shard
from kiln.ops.attention import AttentionMetadata, attention
from kiln.ops.collectives import all_reduce
from kiln.ops.linear import Linear
from kiln.ops.tensor_parallel import TensorParallel
from kiln.ops.vocab_parallel import VocabParallelEmbedding, vocab_parallel_logits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.layer, self.tp = layer, tp
        self.n_heads = tp.local_heads(cfg.num_attention_heads, cfg.num_key_value_heads)
        self.n_kv, self.head_dim = tp.local_kv_heads(cfg.num_key_value_heads), cfg.head_dim
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = rope(q.view(-1, self.n_heads, self.head_dim), positions)
        k = rope(k.view(-1, self.n_kv, self.head_dim), positions)
        v = v.view(-1, self.n_kv, self.head_dim)
        o = attention(q, k, v, kv, self.layer, meta, self.scale)
        return all_reduce(self.o_proj(o.view(-1, self.q_size)), self.tp)


class MLP(nn.Module):
    def __init__(
        self, cfg: ModelConfig, activation: Callable[[Tensor], Tensor] = F.silu, intermediate_size: int | None = None,
        tp: TensorParallel = TensorParallel(),
    ):  # fmt: skip
        super().__init__()
        width = len(tp.split(intermediate_size or cfg.intermediate_size))
        self.tp = tp
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * width, bias=False)
        self.down_proj = Linear(width, cfg.hidden_size, bias=False)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return all_reduce(self.partial(x), self.tp)

    def partial(self, x: Tensor) -> Tensor:
        """This rank's share of the output, before the all-reduce (an MoE layer sums it with its experts' in one)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp=tp)

    def forward(self, x: Tensor, positions: Tensor, rope: RotaryEmbedding, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names that Kiln stores fused: (fused name, part, shard index).
    fused_weights = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Whether load_model may build it with tp.size > 1 (subclasses with other blocks say no).
    tensor_parallel = True
    tp = TensorParallel()  # subclasses that build their own modules stay whole

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, tp.vocab_rows(cfg.vocab_size), bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def forward(self, input_ids: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        """Hidden states after the final norm for every row: [T, hidden]."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rope, kv, meta)
        return self.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Full-vocabulary float32 logits [T, vocab] (on every rank)."""
        return vocab_parallel_logits(self.lm_head, hidden, self.cfg.vocab_size, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy HF-named tensors into Kiln's (partly fused) parameters."""
        params = dict(self.named_parameters(remove_duplicate=False))
        if self.tp.size > 1:  # the last rank's padding rows of the vocabulary are never loaded
            for name in ("embed_tokens.weight", "lm_head.weight"):
                if name in params:
                    params[name].data[len(self.tp.vocab_range(self.cfg.vocab_size)) :].zero_()
        loaded: dict[str, set[str]] = {}
        for name, tensor in weights:
            name = self.checkpoint_name(name.removeprefix("model."))
            if "rotary_emb" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            target, shard, dest = self.locate(name, params)
            copy_weight(dest, read_shard(tensor, self.shard_of(name)))
            loaded.setdefault(target, set()).add(shard)
        missing = []
        for name, param in params.items():
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            got = loaded.get(name, set())
            if "" not in got:  # "" is the whole tensor; otherwise every shard must have come
                missing += [f"{name}#{s}" if s else name for s in self.shards(name, param) if s not in got]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def checkpoint_tensors(self, name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
        """An unsharded parameter of this model as the checkpoint tensors it loads from (fused ones split)."""
        parts = name.split(".")
        fused = parts[-2] if len(parts) >= 2 else ""
        pieces = [hf for hf, (target, _) in self.fused_weights.items() if target == fused]
        if not pieces:
            yield name, tensor
            return
        cfg = self.cfg
        kv = cfg.num_key_value_heads * cfg.head_dim
        sizes = [cfg.num_attention_heads * cfg.head_dim, kv, kv] if fused == "qkv_proj" else [tensor.shape[0] // 2] * 2
        for hf, piece in zip(pieces, tensor.split(sizes)):
            yield ".".join(parts[:-2] + [hf, parts[-1]]), piece

    def checkpoint_name(self, name: str) -> str:
        """A checkpoint tensor's name in this model's terms (architectures that name things differently rename here)."""
        return name

    def locate(self, name: str, params: dict[str, nn.Parameter]) -> tuple[str, str, Tensor]:
        """(parameter, shard, the slice of it) that checkpoint tensor `name` fills; shard "" is the whole parameter."""
        parts = name.split(".")
        fused = self.fused_weights.get(parts[-2]) if len(parts) >= 2 else None
        if fused is None:
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if self.tp.size > 1 and name in ("embed_tokens.weight", "lm_head.weight"):
                return name, "", params[name].data[: len(self.tp.vocab_range(self.cfg.vocab_size))]
            return name, "", params[name].data
        target = ".".join(parts[:-2] + [fused[0], parts[-1]])
        sizes = self._fused_sizes(fused[0], params[target])
        offset = sum(sizes[: fused[1]])
        return target, str(fused[1]), params[target].data[offset : offset + sizes[fused[1]]]

    def shard_of(self, name: str) -> Shard | None:
        """The part of checkpoint tensor `name` this tensor-parallel rank holds; None for all of it."""
        tp, cfg = self.tp, self.cfg
        if tp.size == 1:
            return None
        if name in ("embed_tokens.weight", "lm_head.weight"):
            rows = tp.vocab_range(cfg.vocab_size)
            return Shard(0, rows.start, len(rows))
        heads = tp.head_range(cfg.num_attention_heads, cfg.num_key_value_heads)
        kv, width = tp.kv_head_range(cfg.num_key_value_heads), tp.split(cfg.intermediate_size)
        # projection -> (dimension split, this rank's range, entries per range unit)
        splits = {
            "q_proj": (0, heads, cfg.head_dim),
            "k_proj": (0, kv, cfg.head_dim),
            "v_proj": (0, kv, cfg.head_dim),
            "o_proj": (1, heads, cfg.head_dim),
            "gate_proj": (0, width, 1),
            "up_proj": (0, width, 1),
            "down_proj": (1, width, 1),
        }
        parts = name.split(".")
        split = splits.get(parts[-2]) if len(parts) >= 2 else None
        if split is None:
            return None  # norms: replicated
        dim, part, unit = split
        return Shard(dim, part.start * unit, len(part) * unit)

    def shards(self, name: str, param: Tensor) -> list[str]:
        """The shards a parameter is loaded from when the checkpoint stores it in parts."""
        fused = name.split(".")[-2]
        if fused in ("qkv_proj", "gate_up_proj"):
            return [str(i) for i in range(len(self._fused_sizes(fused, param)))]
        return [""]

    def _fused_sizes(self, fused: str, param: Tensor) -> list[int]:
        cfg = self.cfg
        if fused == "qkv_proj":
            kv = self.tp.local_kv_heads(cfg.num_key_value_heads) * cfg.head_dim
            return [self.tp.local_heads(cfg.num_attention_heads, cfg.num_key_value_heads) * cfg.head_dim, kv, kv]
        return [param.shape[0] // 2] * 2  # gate and up halves, whatever this MLP's width


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 is the Llama block with q/k/v biases, which ModelConfig turns on for model_type qwen2."""
