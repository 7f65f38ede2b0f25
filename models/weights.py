"""Reading safetensors checkpoints into a model's parameters, and checking one against a model before any copy."""

import json
from collections.abc import Iterator
from pathlib import Path

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


def iter_weight_shapes(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the checkpoint as a meta tensor of its shape: the files' headers, no data read."""
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, torch.empty(st.get_slice(name).get_shape(), device="meta")


def check_weights(model: nn.Module, folder: Path) -> None:
    """Raises what `model.load_weights` would raise for this checkpoint (a name with no place, a shape that
    differs, a missing tensor) without touching the model: the load runs on a meta-device twin."""
    with torch.device("meta"):
        twin = type(model)(model.cfg)
    twin.load_weights(iter_weight_shapes(folder))
