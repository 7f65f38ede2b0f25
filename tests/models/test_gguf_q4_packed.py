"""The packed int4 buffers cached beside a GGUF's Q4_1 blocks: a second load takes them as they were made, and a
file written for another dtype, rank or torch, or one cut short or garbled, is packed again and rewritten. SmolLM2's first
two layers, on a model built on the meta device (only the replaced projections hold values)."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kiln.models.gguf_q4 import GGUFQ4_1, load_q4_1
from kiln.models.gguf_q4_packed import packed_path
from kiln.models.loader import default_model_path, read_config, resolve_checkpoint
from kiln.models.registry import model_class
from kiln.ops.quant_linear import Int4Linear
from kiln.ops.tensor_parallel import TensorParallel

LAYERS = 2


@pytest.fixture(scope="module")
def blocks() -> Path:
    """The converted checkpoint's Q4_1 blocks, parsed from the GGUF if no start has written them yet."""
    folder = resolve_checkpoint(None, Path.home() / ".cache" / "kiln")
    GGUFQ4_1(default_model_path(), folder / "q4_1.blocks").tensors
    return folder / "q4_1.blocks"


@pytest.fixture
def cache(blocks: Path, tmp_path: Path) -> Path:
    """The blocks in a folder of their own, where the packed files are written."""
    (tmp_path / "q4_1.blocks").symlink_to(blocks)
    return tmp_path / "q4_1.blocks"


@pytest.fixture
def packings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One entry per layer packed from the blocks (rather than taken from the cache)."""
    calls: list[str] = []
    make = Int4Linear.__init__

    def counted(self, *args, **kwargs) -> None:
        calls.append("packed")
        make(self, *args, **kwargs)

    monkeypatch.setattr(Int4Linear, "__init__", counted)
    return calls


def load(cache: Path, dtype: torch.dtype = torch.bfloat16, tp: TensorParallel = TensorParallel(), dense_from_rows: int = 0) -> dict[str, Int4Linear]:
    cfg = dataclasses.replace(read_config(cache.resolve().parent), num_hidden_layers=LAYERS)
    with torch.device("meta"):
        model = model_class(cfg)(cfg) if tp.size == 1 else model_class(cfg)(cfg, tp=tp)
    assert load_q4_1(model, GGUFQ4_1(default_model_path(), cache), cfg, dtype, tp, dense_from_rows) == 4 * LAYERS
    return {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}


def assert_same(got: dict[str, Int4Linear], want: dict[str, Int4Linear]) -> None:
    assert got.keys() == want.keys() and len(got) == 4 * LAYERS
    for name, layer in got.items():
        for buffer, value in want[name].state_dict().items():
            assert torch.equal(layer.state_dict()[buffer], value), (name, buffer)
            assert layer.state_dict()[buffer].dtype == value.dtype
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(layer.scales_zeros.dtype)
        assert torch.equal(layer(x), want[name](x)), name


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("dense_from_rows", [0, 32], ids=["packed", "float32-copies"])
def test_a_second_load_takes_the_buffers_made_by_the_first(cache, packings, dense_from_rows):
    first = load(cache, dense_from_rows=dense_from_rows)
    assert len(packings) == 4 * LAYERS
    path = packed_path(cache, torch.bfloat16, TensorParallel())
    written = path.stat()
    assert metadata(path)["dtype"] == "bfloat16" and metadata(path)["torch"] == torch.__version__
    second = load(cache, dense_from_rows=dense_from_rows)
    assert len(packings) == 4 * LAYERS  # nothing packed again
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # nor rewritten
    assert all((layer.dense is not None) == bool(dense_from_rows) for layer in second.values())
    assert_same(second, first)


def fresh_blocks(cache: Path, tmp_path: Path) -> Path:
    """The same blocks in a folder with no packed file yet."""
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "q4_1.blocks").symlink_to(cache.resolve())
    return tmp_path / "fresh" / "q4_1.blocks"


def test_a_file_for_another_dtype_is_packed_again(cache, packings, tmp_path):
    bf16, f32 = packed_path(cache, torch.bfloat16, TensorParallel()), packed_path(cache, torch.float32, TensorParallel())
    load(cache, torch.bfloat16)
    shutil.copy(bf16, f32)  # bfloat16's buffers under float32's name
    got = load(cache, torch.float32)
    assert len(packings) == 2 * 4 * LAYERS
    assert metadata(f32)["dtype"] == "float32" and metadata(bf16)["dtype"] == "bfloat16"  # each dtype keeps its own file
    assert_same(got, load(fresh_blocks(cache, tmp_path), torch.float32))
    assert_same(load(cache, torch.float32), got)  # and the rewritten file serves the next load
    assert len(packings) == 3 * 4 * LAYERS


def test_a_file_for_another_rank_is_packed_again(cache, packings, tmp_path):
    first, second = TensorParallel(0, 2), TensorParallel(1, 2)
    load(cache, tp=first)
    shutil.copy(packed_path(cache, torch.bfloat16, first), packed_path(cache, torch.bfloat16, second))  # rank 0's shards under rank 1's name
    got = load(cache, tp=second)
    assert len(packings) == 2 * 4 * LAYERS
    assert metadata(packed_path(cache, torch.bfloat16, second))["tp_rank"] == "1"
    assert metadata(packed_path(cache, torch.bfloat16, first))["tp_rank"] == "0"  # each rank keeps its own file
    assert_same(got, load(fresh_blocks(cache, tmp_path), tp=second))


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


def drop_a_layer(path: Path) -> None:
    tensors = load_file(path)
    del tensors["layers.1.mlp.down_proj.packed"]
    save_file(tensors, path, metadata=metadata(path))


def shrink_a_layer(path: Path) -> None:
    tensors = load_file(path)
    tensors["layers.1.mlp.down_proj.scales_zeros"] = tensors["layers.1.mlp.down_proj.scales_zeros"][1:].contiguous()
    save_file(tensors, path, metadata=metadata(path))


def from_another_torch(path: Path) -> None:
    """The same tensors, whose layout another torch would have made differently."""
    save_file(load_file(path), path, metadata={**metadata(path), "torch": "2.0.0"})


@pytest.mark.parametrize("spoil", [cut_short, garble_header, drop_a_layer, shrink_a_layer, from_another_torch])
def test_a_spoilt_file_is_not_trusted(cache, packings, spoil):
    first = load(cache)
    path = packed_path(cache, torch.bfloat16, TensorParallel())
    spoil(path)
    again = load(cache)
    assert len(packings) == 4 * LAYERS + (1 if spoil in (drop_a_layer, shrink_a_layer) else 4 * LAYERS)
    assert_same(again, first)
    assert metadata(path)["torch"] == torch.__version__
    assert_same(load(cache), first)  # rewritten whole: the next load packs nothing
    assert len(packings) == 4 * LAYERS + (1 if spoil in (drop_a_layer, shrink_a_layer) else 4 * LAYERS)
