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

The packed kernels win only at few rows. From a few dozen rows up (prefill chunks,
large decode batches) the GEMM is bound by arithmetic, and torch's int4 and int8
kernels run at half the speed of a float32 GEMM (SmolLM2's projections on a 2-vCPU
AVX-512 Xeon, 30 layers: 32 rows 104 ms int4 against 82 float32; 2,048 rows 4.7 s
against 2.4). So a layer built with `dense_from_rows` also keeps its weight
de-quantized in float32, exactly as the kernel sees it, and the op sends batches of at
least that many rows to `kiln::linear`'s float32 GEMM. The copy costs 4 bytes a weight.
"""

import torch
from torch import Tensor, nn

from kiln.ops.linear import cpu_float32_linear

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("linear_int8(Tensor x, Tensor weight, Tensor scales, Tensor? bias, Tensor? dense, int dense_from_rows) -> Tensor")
_lib.define(
    "linear_int4(Tensor x, Tensor packed, Tensor scales_zeros, int group_size, Tensor? bias, Tensor? dense, int dense_from_rows) -> Tensor"
)


def _dense(x: Tensor, dense: Tensor) -> Tensor:
    return cpu_float32_linear(x.float(), dense, None).to(x.dtype)


def _linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None, dense: Tensor | None, dense_from_rows: int) -> Tensor:
    if dense is not None and x.shape[0] >= dense_from_rows:
        out = _dense(x, dense)
    else:
        out = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales)
    return out if bias is None else out + bias


def _linear_int4(
    x: Tensor, packed: Tensor, scales_zeros: Tensor, group_size: int, bias: Tensor | None, dense: Tensor | None, dense_from_rows: int
) -> Tensor:
    if dense is not None and x.shape[0] >= dense_from_rows:
        out = _dense(x, dense)
    else:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_zeros)
    return out if bias is None else out + bias


_lib.impl("linear_int8", _linear_int8, "CPU")
_lib.impl("linear_int4", _linear_int4, "CPU")


@torch.library.register_fake("kiln::linear_int8")
def _(x, weight, scales, bias, dense, dense_from_rows):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("kiln::linear_int4")
def _(x, packed, scales_zeros, group_size, bias, dense, dense_from_rows):
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
    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None, dtype: torch.dtype, dense_from_rows: int = 0):
        """q: int8 [out, in]; scales: [out]; w = q * scale. dense_from_rows > 0 keeps a float32 copy for that many rows and more."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if not int8_fits(self.out_features, self.in_features):
            raise ValueError(f"int8 needs in_features % 16 == 0, got {tuple(q.shape)}")
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self.register_buffer("dense", q.float() * self.scales.float()[:, None] if dense_from_rows else None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_int8(x, self.weight_int8, self.scales, self.bias, self.dense, self.dense_from_rows)


class Int4Linear(nn.Module):
    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, dtype: torch.dtype, dense_from_rows: int = 0):
        """q: [out, in] values 0..15; scale, zero: [out, in / group]; w = (q - 8) * scale + zero.
        dense_from_rows > 0 keeps a float32 copy for that many rows and more."""
        super().__init__()
        out_features, in_features = q.shape
        group_size = in_features // scale.shape[1]
        if not int4_fits(out_features, in_features, group_size):
            raise ValueError(f"int4 needs out_features % 16 == 0 and in_features % group == 0, got {tuple(q.shape)}, group {group_size}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # The kernel's layout: [in / group, out, (scale, zero)].
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        self._hold(packed, scales_zeros, in_features, bias, dense_from_rows, q)

    @classmethod
    def from_packed(
        cls, packed: Tensor, scales_zeros: Tensor, in_features: int, bias: Tensor | None, dense_from_rows: int = 0, q: Tensor | None = None
    ) -> "Int4Linear":
        """A layer from the buffers another one made (`packed`, in this torch's layout, and `scales_zeros`, in
        the activations' dtype), without packing again. The float32 copy (dense_from_rows > 0) needs q."""
        if dense_from_rows and q is None:
            raise ValueError("a float32 copy (dense_from_rows > 0) is rebuilt from q, which was not given")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._hold(packed, scales_zeros, in_features, bias, dense_from_rows, q)
        return layer

    def _hold(self, packed: Tensor, scales_zeros: Tensor, in_features: int, bias: Tensor | None, dense_from_rows: int, q: Tensor | None) -> None:
        self.out_features, self.in_features = scales_zeros.shape[1], in_features
        self.group_size = in_features // scales_zeros.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.to(scales_zeros.dtype), requires_grad=False)
        self.dense_from_rows = dense_from_rows
        self.register_buffer("dense", _int4_dense(q, scales_zeros) if dense_from_rows else None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_int4(x, self.packed, self.scales_zeros, self.group_size, self.bias, self.dense, self.dense_from_rows)


def _int4_dense(q: Tensor, scales_zeros: Tensor) -> Tensor:
    """The float32 weights the int4 kernel computes with: its scales and zeros in the activations' dtype."""
    out_features, in_features = q.shape
    scale, zero = (scales_zeros[..., i].t().float()[..., None] for i in (0, 1))
    return ((q.float().view(out_features, scales_zeros.shape[0], -1) - 8) * scale + zero).view(out_features, in_features)
