"""Reading safetensors checkpoints into a model's parameters, and checking one against a model before any copy."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn


class ModelNotFoundError(RuntimeError):
    pass


def copy_weight(dest: Tensor, src: Tensor) -> None:
    """`dest.copy_(src)` for same-shaped tensors only: copy_ would broadcast a [1, n] tensor into [n] silently."""
    if dest.shape != src.shape:
        raise ValueError(f"Attempted to load weight ({src.size()}) into parameter ({dest.size()})")
    dest.copy_(src)


class Shard(NamedTuple):
    """The part of a checkpoint tensor one tensor-parallel rank reads: `length` entries of `dim` from `start`."""

    dim: int
    start: int
    length: int


def read_shard(src: Any, shard: Shard | None) -> Tensor:
    """The shard of a checkpoint tensor, or all of it; `src` is a tensor or a safetensors slice (whose indexing
    reads only those bytes from the file)."""
    if isinstance(src, Tensor):
        return src if shard is None else src.narrow(shard.dim, shard.start, shard.length)
    if shard is None:
        return src[:]
    index = (slice(None),) * shard.dim + (slice(shard.start, shard.start + shard.length),)
    return src[index]


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"Cannot find any model weights with `{folder}`")
    return files


def iter_weights(folder: Path) -> Iterator[tuple[str, Tensor]]:
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def iter_weight_slices(folder: Path) -> Iterator[tuple[str, Any]]:
    """Every tensor of the checkpoint as a safetensors slice, read only when indexed (`read_shard`): a
    tensor-parallel rank reads its shard of each tensor and nothing else."""
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, st.get_slice(name)


def iter_weight_shapes(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the checkpoint as a meta tensor of its shape: the files' headers, no data read."""
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, torch.empty(st.get_slice(name).get_shape(), device="meta")


def check_weights(model: nn.Module, folder: Path) -> None:
    """Raises what `model.load_weights` would raise for this checkpoint (a name with no place, a shape that
    differs, a missing tensor) without touching the model: the load runs on a meta-device twin."""
    tp = getattr(model, "tp", None)
    with torch.device("meta"):
        twin = type(model)(model.cfg) if tp is None or tp.size == 1 else type(model)(model.cfg, tp=tp)
    twin.load_weights(iter_weight_shapes(folder))
