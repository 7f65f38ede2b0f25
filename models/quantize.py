"""Swapping a loaded model's dense linears for quantized ones (`--torchao-config`, SGLang's and torchao's spelling).

Weight-only modes: `int8wo` (int8 per output row) and `int4wo-<group>` (int4 in
groups of 32, 64, 128 or 256 along the input). With activations quantized to int8
on the fly (ops/act_int8_linear.py): `int8dq` (int8 weights per output row) and
`8da4w-32` (int4 in groups of 32). The projections of every layer (q/k/v, o,
gate/up, down) take the mode; the LM head takes int8 (int8wo, or int8dq in the
modes with int8 activations), since the logits are what a sampler and a logprob
read (llama.cpp keeps SmolLM2's head in 8 bits too), and the embedding stays dense
(a lookup reads one row per token). A projection whose shape the int4 layout
cannot hold (rows not in sixteens) takes int8, and one the int8 kernel cannot
(inputs not in sixteens, or not in blocks of 32 with int8 activations) stays dense.
MoE routers and experts stay as they are.
"""

import re

import torch
from torch import nn

from kiln.ops.linear import Linear
from kiln.ops.quant_linear import Int4Linear, Int8Linear, int4_fits, int4_weights, int8_fits, int8_weights
from kiln.ops.act_int8_linear import W4A8Linear, W8A8Linear

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# The modes whose linears round their activations to int8 (the C++ kernels of ops/act_int8_linear_cpu.cpp).
INT8_ACTIVATION_MODES = ("int8dq", "8da4w-32")
_MODE = re.compile(r"int8wo|int4wo-(32|64|128|256)|int8dq|8da4w-32")


def check_mode(mode: str) -> str:
    """`none`, `int8wo`, `int4wo-<group>`, `int8dq` or `8da4w-32`; anything else is the user's error, said before any
    loading."""
    if mode not in ("", "none") and not _MODE.fullmatch(mode):
        raise ValueError(
            f"--torchao-config {mode!r} is not supported; use int8wo, int4wo-32, int4wo-64, int4wo-128, int4wo-256, int8dq, 8da4w-32 or none"
        )
    return mode or "none"


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize(model: nn.Module, mode: str, dtype: torch.dtype, dense_from_rows: int = 0) -> dict[str, int]:
    """Quantizes the dense linears in place; returns how many went to each format. dense_from_rows: see
    ops/quant_linear.py."""
    group = int(mode.split("-")[1]) if mode.startswith(("int4wo", "8da4w")) else 0
    formats: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, Linear):
            continue
        is_head, is_projection = name == "lm_head", name.rsplit(".", 1)[-1] in PROJECTIONS
        if not (is_head or is_projection):
            continue
        weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
        whole_blocks = weight.shape[1] % 32 == 0  # what int8 activations are quantized in
        if mode == "8da4w-32" and is_projection and whole_blocks:
            new, fmt = W4A8Linear.from_int4(*int4_weights(weight, group), bias, dtype), mode
        elif mode in ("int8dq", "8da4w-32") and whole_blocks:
            new, fmt = W8A8Linear(*int8_weights(weight), bias, dtype), "int8dq"
        elif mode.startswith("int4wo") and is_projection and int4_fits(*weight.shape, group):
            new, fmt = Int4Linear(*int4_weights(weight, group), bias, dtype, dense_from_rows), f"int4wo-{group}"
        elif int8_fits(*weight.shape):
            new, fmt = Int8Linear(*int8_weights(weight), bias, dtype, dense_from_rows), "int8wo"
        else:
            formats["dense"] = formats.get("dense", 0) + 1
            continue
        replace_linear(model, name, new)
        formats[fmt] = formats.get(fmt, 0) + 1
    return formats
