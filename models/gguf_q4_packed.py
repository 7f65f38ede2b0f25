"""The int4 layers' buffers made from a GGUF's Q4_1 blocks, kept beside the blocks (`q4_1.blocks`) so that a
later start reads them instead of unpacking and packing every projection again (about 1 s of SmolLM2-135M's
start on two cores).

What a file holds depends on more than the blocks: the packed layout is torch's own
(`_convert_weight_to_int4pack_for_cpu`) and may change between versions, the scales and zeros are stored in the
activations' dtype, and a tensor-parallel rank holds its own shards. So each rank (ranks load at once) and dtype
has its own file, and the file's metadata carries the whole key; a file with another key, one safetensors cannot
read (cut short, garbled header), or one whose tensors have other shapes is not used, and the loader packs again
and rewrites it, aside and renamed as `GGUFQ4_1` writes its blocks. The float32 copies (`dense_from_rows`) are
not kept: they are four times the size of the weights and rebuilt from the blocks.
"""

import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from kiln.ops.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

# What `load_q4_1` makes of the blocks (which parts it fuses, the row order): raised when that changes, so
# that files written by an older Kiln are packed again.
FORMAT = "1"


def packed_path(blocks: Path, dtype: torch.dtype, tp: TensorParallel) -> Path:
    """Safetensors inside, but not named *.safetensors: the checkpoint's weights are every such file in the folder."""
    return blocks.with_name(f"q4_1.packed.{str(dtype).removeprefix('torch.')}.tp{tp.rank}of{tp.size}")


def packed_key(dtype: torch.dtype, tp: TensorParallel, group_size: int) -> dict[str, str]:
    """Everything the buffers depend on besides the blocks, which the folder's own key fixes."""
    return {
        "format": FORMAT, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "tp_rank": str(tp.rank), "tp_size": str(tp.size), "group_size": str(group_size),
    }  # fmt: skip


def read_packed(path: Path, key: dict[str, str]) -> dict[str, Tensor]:
    """The file's tensors by name, or none when it is absent, unreadable or written under another key."""
    if not path.exists():
        return {}
    try:
        with safe_open(path, "pt") as f:
            if f.metadata() != key:
                log.info("%s was written for %s, not %s: packing again", path.name, f.metadata(), key)
                return {}
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        log.warning("%s cannot be read (%s): packing again", path.name, exc)
        return {}


def packed_buffers(tensors: dict[str, Tensor], name: str, out_features: int, in_features: int, key: dict[str, str]) -> tuple[Tensor, Tensor] | None:
    """Layer `name`'s (packed, scales_zeros) from `read_packed`'s tensors, if they are there in its shapes."""
    packed, scales_zeros = tensors.get(f"{name}.packed"), tensors.get(f"{name}.scales_zeros")
    if packed is None or scales_zeros is None:
        return None
    groups = in_features // int(key["group_size"])
    # Four bits a weight, however torch lays them out; scales and zeros in Kiln's own layout.
    if packed.dtype != torch.uint8 or packed.numel() * 2 != out_features * in_features:
        return None
    if scales_zeros.dtype != getattr(torch, key["dtype"]) or scales_zeros.shape != (groups, out_features, 2):
        return None
    return packed, scales_zeros


def write_packed(path: Path, key: dict[str, str], buffers: dict[str, tuple[Tensor, Tensor]]) -> None:
    tensors = {f"{name}.{kind}": t for name, pair in buffers.items() for kind, t in zip(("packed", "scales_zeros"), pair)}
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    save_file(tensors, part, metadata=key)
    os.replace(part, path)
