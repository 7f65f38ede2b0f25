"""Maps a checkpoint's `architectures` entry to the Kiln module that implements it."""

from torch import nn

from kiln.models.config import ModelConfig
from kiln.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    for arch in cfg.architectures:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ValueError(
        f"architecture {cfg.architectures} is not supported; Kiln knows {sorted(ARCHITECTURES)}"
    )
