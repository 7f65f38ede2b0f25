"""Weight-only quantized linears on torch's packed CPU kernels: int8 per output channel, int4 in groups.

Decode reads every weight once per step, so fewer weight bytes is a faster step
wherever the kernel keeps up with memory. `Int8Linear` stores int8 weights and one
scale per output row (`aten._weight_int8pack_mm`); `Int4Linear` stores 4-bit values
in groups of 32/64/128 along the input, each group with a scale and a zero, as
`w = (q - 8) * scale + zero` (`aten._weight_int4pack_mm_for_cpu`, whose packed layout
`_convert_weight_to_int4pack_for_cpu` makes). A GGUF's Q4_1 block of 32 is exactly
such a group (`w = d * q + m`: scale d, zero m + 8d), which is how Kiln serves those
weights without a dense copy (`models/gguf_q4.py`).

Both run as custom ops (`kiln::linear_int8`, `kiln::linear_int4`), opaque to Dynamo as
`kiln::linear` is: compiled pieces call them as they are. Scales and zeros are kept in
the activations' dtype, which the kernels require. CPU only: on CUDA the packed
layouts differ.
"""

import torch
from torch import Tensor, nn

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("linear_int8(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor")
_lib.define("linear_int4(Tensor x, Tensor packed, Tensor scales_zeros, int group_size, Tensor? bias) -> Tensor")


def _linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales)
    return out if bias is None else out + bias


def _linear_int4(x: Tensor, packed: Tensor, scales_zeros: Tensor, group_size: int, bias: Tensor | None) -> Tensor:
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_zeros)
    return out if bias is None else out + bias


_lib.impl("linear_int8", _linear_int8, "CPU")
_lib.impl("linear_int4", _linear_int4, "CPU")


@torch.library.register_fake("kiln::linear_int8")
def _(x, weight, scales, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("kiln::linear_int4")
def _(x, packed, scales_zeros, group_size, bias):
    return x.new_empty(x.shape[0], packed.shape[0])


def int8_fits(out_features: int, in_features: int) -> bool:
    """`_weight_int8pack_mm` reads the input in sixteens: with bfloat16 activations other widths crash or
    give wrong sums (torch 2.13)."""
    return in_features % 16 == 0


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """The packed int4 layout needs whole groups along the input and output rows in sixteens."""
    return out_features % 16 == 0 and in_features % group_size == 0


def int8_weights(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 of a dense [out, in] weight: (q int8 [out, in], scales float32 [out]), w ~ q * scale."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8), scales


def int4_weights(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4 per group of a dense [out, in] weight, each group's range in 16 steps:
    (q [out, in] in 0..15, scale, zero [out, in / group]) with w ~ (q - 8) * scale + zero."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).view(out_features, in_features)
    return q.to(torch.uint8), scale, lo + 8 * scale


class Int8Linear(nn.Module):
    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None, dtype: torch.dtype):
        """q: int8 [out, in]; scales: [out]; w = q * scale."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if not int8_fits(self.out_features, self.in_features):
            raise ValueError(f"int8 needs in_features % 16 == 0, got {tuple(q.shape)}")
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_int8(x, self.weight_int8, self.scales, self.bias)


class Int4Linear(nn.Module):
    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, dtype: torch.dtype):
        """q: [out, in] values 0..15; scale, zero: [out, in / group]; w = (q - 8) * scale + zero."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = q.shape[1] // scale.shape[1]
        if not int4_fits(self.out_features, self.in_features, self.group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % group == 0, got {tuple(q.shape)}, group {self.group_size}")
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1))
        # The kernel's layout: [in / group, out, (scale, zero)].
        self.register_buffer("scales_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_int4(x, self.packed, self.scales_zeros, self.group_size, self.bias)
