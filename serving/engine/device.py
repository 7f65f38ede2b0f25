"""Which device, dtype and quantization an engine runs with, and how much memory it may take."""

import os
import torch

from kiln.models.gguf_q4 import GGUFQ4_1
from kiln.models.loader import default_quantization
from kiln.models.quantize import check_mode


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def resolve_quantization(torchao_config: str, dtype_name: str, device: torch.device, gguf: GGUFQ4_1 | None) -> tuple[str, torch.dtype]:
    """(--torchao-config in effect, activation dtype). Quantized linears run on the CPU only, and with
    --dtype auto in bfloat16: torch's packed CPU kernels are fast with bfloat16 activations only, native or not
    (SmolLM2 at batch 1 on an AVX-512 Xeon without AVX512-BF16: 45 ms a token in bfloat16, 396 in float32)."""
    mode = check_mode(torchao_config) if torchao_config else default_quantization(gguf, dtype_name, device)
    if mode == "none":
        return mode, resolve_dtype(dtype_name, device)
    if device.type != "cpu":
        raise ValueError(f"--torchao-config {mode} runs on the CPU only; this engine runs on {device}")
    return mode, torch.bfloat16 if dtype_name == "auto" else resolve_dtype(dtype_name, device)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
