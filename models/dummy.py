"""Dummy weights (`--load-format dummy`, as in SGLang and vLLM): a model built from a config alone, with random
weights, so that a model's speed can be measured where its checkpoint is not available."""

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from kiln.models.gemma3 import GemmaRMSNorm
from kiln.models.llama import RMSNorm
from kiln.models.weights import ModelNotFoundError
from kiln.ops.tensor_parallel import TensorParallel

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "profiles" / "configs"
# The initializer_range of most Hugging Face configs: logits stay near unit scale whatever the depth.
STD = 0.02
# The weight that makes each norm scale by one (Gemma's scale by 1 + weight).
NORM_WEIGHT: dict[type[nn.Module], float] = {RMSNorm: 1.0, nn.LayerNorm: 1.0, GemmaRMSNorm: 0.0}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def shipped_configs() -> list[str]:
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").exists())


def dummy_config_folder(model_path: str | None) -> Path:
    """The folder whose config.json describes the model: --model-path itself, or a config shipped in
    profiles/configs/ (one folder per name, holding only config.json)."""
    if not model_path:
        raise ModelNotFoundError(f"--load-format dummy needs --model-path: a folder with config.json, or one of {shipped_configs()}")
    path = Path(model_path).expanduser()
    for folder in (path, SHIPPED_CONFIGS / model_path):
        if (folder / "config.json").is_file():
            return folder
    raise ModelNotFoundError(f"{model_path} (neither a folder with config.json nor a shipped config: {shipped_configs()})")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def _whole_draws(model: nn.Module, gen: torch.Generator) -> Iterator[tuple[str, Tensor]]:
    """The unsharded model's draws, one parameter at a time, as the checkpoint tensors it would load from."""
    param = next(model.parameters())
    with torch.device("meta"):
        whole = type(model)(model.cfg)
    for name, shape in [(n, p.shape) for n, p in whole.named_parameters()]:
        drawn = torch.empty(shape, dtype=param.dtype, device=param.device).normal_(0.0, STD, generator=gen)
        yield from model.checkpoint_tensors(name, drawn)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, tp: TensorParallel = TensorParallel()) -> None:
    """Fills every parameter in place: matrices from N(0, STD^2), norms with their identity scale, biases with zero.

    The generator lives on the parameters' device (no 8B-element CPU draw to copy over), and parameters are
    visited in the module's fixed order, so one seed gives the same weights on every start on that device.
    A tensor-parallel rank draws the whole model's numbers, one parameter at a time, and keeps its shard:
    every rank pays the unsharded model's draw time and one whole parameter of memory at a time, and the
    shards are exactly the single-rank dummy model's.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    if tp.size == 1:
        for param in model.parameters():
            param.normal_(0.0, STD, generator=gen)
    else:
        model.load_weights(_whole_draws(model, gen))
    for module in model.modules():
        if type(module) in NORM_WEIGHT:
            module.weight.fill_(NORM_WEIGHT[type(module)])
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.zero_()
