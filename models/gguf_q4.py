"""A GGUF's Q4_1 projections loaded straight into packed int4 layers: the very weights llama.cpp serves.

A Q4_1 block holds 32 weights of one row as a float16 scale d, a float16 minimum m and
32 four-bit values q (the first 16 in the low nibbles, the next 16 in the high ones),
w = d * q + m. That is an int4 group of 32 with scale d and zero m + 8d in the packed
kernel's w = (q - 8) * scale + zero, so no value is rounded again. llama.cpp's
converter reorders Llama's q and k rows for its rotary layout; transformers undoes it
when it de-quantizes, and so does this loader, on whole rows.
"""

import logging
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
import torch
from torch import Tensor, nn

from kiln.models.config import ModelConfig
from kiln.models.gguf_q4_packed import packed_buffers, packed_key, packed_path, read_packed, write_packed
from kiln.models.quantize import replace_linear
from kiln.ops.quant_linear import Int4Linear
from kiln.ops.act_int8_linear import W4A8Linear
from kiln.ops.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

Q4_1_GROUP = 32
Q4_1_BLOCK_BYTES = 20
# Kiln module of each layer -> the GGUF tensors it fuses, in order.
MODULES = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
    "mlp.down_proj": ("ffn_down",),
}
# GGUF tensor -> the checkpoint tensor the model's `shard_of` knows it by (within its layer).
CHECKPOINT_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip


class GGUFQ4_1:
    """A GGUF's Q4_1 tensors by name (their raw blocks, uint8 [rows, blocks * 20]), read on first use and then
    kept. Parsing the file takes seconds (2.8 s for SmolLM2's, most of it the tokenizer's metadata), so with a
    `cache` file (beside the converted checkpoint, in safetensors' format but named apart from the weights the
    loader reads) the tensors are written there once and later starts map that instead."""

    def __init__(self, path: Path, cache: Path | None = None):
        self.path = path
        self.cache = cache
        self._tensors: dict[str, np.ndarray] | None = None

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            self._tensors = self._read()
        return self._tensors

    def _read(self) -> dict[str, np.ndarray]:
        if self.cache is not None and self.cache.exists():
            return load_file(self.cache)
        from gguf import GGMLQuantizationType, GGUFReader

        tensors = {t.name: np.asarray(t.data) for t in GGUFReader(self.path).tensors if t.tensor_type == GGMLQuantizationType.Q4_1}
        if self.cache is not None:
            # Written aside and renamed: tensor-parallel ranks may fill the same cache at once.
            part = self.cache.with_name(f"{self.cache.name}.{os.getpid()}.part")
            save_file(tensors, part)
            os.replace(part, self.cache)
        return tensors


def q4_1_groups(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 rows [N, blocks * 20 bytes] -> (q uint8 [N, K] in 0..15, scale, zero float32 [N, K / 32])."""
    blocks = torch.from_numpy(np.array(raw)).view(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    nibbles = blocks[..., 4:]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).flatten(1)
    return q, d, m + 8 * d


def _llama_row_order(rows: int, heads: int) -> Tensor:
    """Row i of the de-permuted weight is row order[i] of llama.cpp's."""
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).flatten()


def _shard_rows(raw: np.ndarray, model: nn.Module, name: str) -> np.ndarray | None:
    """This tensor-parallel rank's part of a Q4_1 tensor [rows, blocks * 20 bytes]: whole rows for a
    column-parallel weight, whole blocks of inputs for a row-parallel one; None where the inputs' shard does
    not fall on block edges."""
    shard = model.shard_of(name)
    if shard is None:
        return raw
    if shard.dim == 0:
        return raw[shard.start : shard.start + shard.length]
    if shard.start % Q4_1_GROUP or shard.length % Q4_1_GROUP:
        return None
    first = shard.start // Q4_1_GROUP * Q4_1_BLOCK_BYTES
    return raw[:, first : first + shard.length // Q4_1_GROUP * Q4_1_BLOCK_BYTES]


def load_q4_1(
    model: nn.Module,
    gguf: GGUFQ4_1,
    cfg: ModelConfig,
    dtype: torch.dtype,
    tp: TensorParallel = TensorParallel(),
    dense_from_rows: int = 0,
    int8_activations: bool = False,
) -> int:
    """Replaces each projection whose GGUF tensors are all Q4_1 with an `Int4Linear`, or a `W4A8Linear` with
    `int8_activations`; returns how many. A tensor-parallel rank reads its shard's rows or input blocks only; a
    row-parallel shard that splits a block stays dense (logged), for `quantize` to take. With the blocks cached,
    the Int4Linear layers' packed buffers are cached beside them (`gguf_q4_packed.py`) and taken from there on
    later loads; a W4A8Linear's layout is a reshape of the blocks, made at each load."""
    tensors = gguf.tensors
    path = None if gguf.cache is None or int8_activations else packed_path(gguf.cache, dtype, tp)
    key = packed_key(dtype, tp, Q4_1_GROUP)
    cached = {} if path is None else read_packed(path, key)
    buffers: dict[str, tuple[Tensor, Tensor]] = {}
    packed_now = False
    loaded = 0
    for layer in range(cfg.num_hidden_layers):
        for module, parts in MODULES.items():
            found = [tensors.get(f"blk.{layer}.{part}.weight") for part in parts]
            if any(t is None for t in found):
                continue
            raws = [_shard_rows(t, model, f"layers.{layer}.{CHECKPOINT_NAMES[p]}.weight") for p, t in zip(parts, found)]
            if any(raw is None for raw in raws):
                log.info("layers.%d.%s: its rank-%d shard splits Q4_1 blocks, so it is loaded dense", layer, module, tp.rank)
                continue
            name = f"layers.{layer}.{module}"
            dense = model.get_submodule(name)
            out_features, in_features = dense.weight.shape
            bias = None if dense.bias is None else dense.bias.detach()
            if int8_activations:
                replace_linear(model, name, W4A8Linear.from_int4(*_module_groups(parts, raws, cfg), bias, dtype))
                loaded += 1
                continue
            done = packed_buffers(cached, name, out_features, in_features, key)
            if done is None:
                q, scale, zero = _module_groups(parts, raws, cfg)
                if q.shape != dense.weight.shape:
                    raise ValueError(f"{gguf.path.name}: {name} is {tuple(q.shape)} in the GGUF but {tuple(dense.weight.shape)} in the model")
                int4 = Int4Linear(q, scale, zero, bias, dtype, dense_from_rows)
                packed_now = True
            else:
                # The float32 copy is not cached (4 bytes a weight): it is rebuilt from the blocks' values.
                q = _module_groups(parts, raws, cfg)[0] if dense_from_rows else None
                int4 = Int4Linear.from_packed(*done, in_features, bias, dense_from_rows, q)
            replace_linear(model, name, int4)
            buffers[name] = (int4.packed, int4.scales_zeros)
    if path is not None and (packed_now or len(cached) != 2 * len(buffers)):
        write_packed(path, key, buffers)
    return loaded + len(buffers)


def _module_groups(parts: tuple[str, ...], raws: list[np.ndarray], cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """One module's (q, scale, zero), its GGUF tensors' rows in the model's order and fused."""
    groups = []
    for part, raw in zip(parts, raws):
        q, scale, zero = q4_1_groups(raw)
        if cfg.model_type == "llama" and part in ("attn_q", "attn_k"):
            # The reordering stays within each head, and a shard holds whole heads.
            order = _llama_row_order(q.shape[0], q.shape[0] // cfg.head_dim)
            q, scale, zero = q[order], scale[order], zero[order]
        groups.append((q, scale, zero))
    q, scale, zero = (torch.cat(g) for g in zip(*groups))
    return q, scale, zero
