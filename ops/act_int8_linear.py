"""Linears whose activations are quantized to int8 on the fly (torchao's "8da4w"; SGLang's "int8dq" for int8
weights): the arithmetic llama.cpp does with a Q4_1 GGUF and its Q8_0 head.

Each call quantizes its input per row and block of 32 to int8 (x ~ s * xq, s = max|x| / 127). `W4A8Linear` holds
int4 weights in groups of 32, w = d * q + m (a GGUF Q4_1 block as it is, d and m in float16), and sums
d * s * (q . xq) + m * sum(x) over the blocks; `W8A8Linear` holds int8 weights with a scale per output row and
sums s * (wq . xq). The dot products are integer ones, which AVX512-VNNI's vpdpbusd does 64 at a time
(act_int8_linear_cpu.cpp). Torch's int4 and int8 kernels instead turn every weight into a float32 and do one FMA
a weight: bound by that arithmetic from a few rows up. SmolLM2's 120 projections, 2-vCPU AVX-512 Xeon, bfloat16:
1 row 4.2 ms against torch's int4 4.6 (both near the memory bound), 8 rows 6.5 against 14.6, 32 rows 20.9 against
57.6.

The price is the activations' rounding: an input is off by at most half of its block's s (the weights' own
rounding is the GGUF's). tests/ops/test_act_int8_linear.py states the bound against the de-quantized weights,
and tests/models/test_quantize.py the perplexity.

The ops (`kiln::linear_w4a8`, `kiln::linear_w8a8`) are opaque to Dynamo, like `kiln::linear`; their CPU kernels
are registered in C++ by the kernels' library, so a compiled piece calls them without Python. On a CPU without
AVX512-VNNI they run `w4a8_torch` and `w8a8_torch`, the same arithmetic in torch ops (slow: float copies of the
weights every call), which are also the reference the kernels are tested against. A row's result never depends
on the other rows of its batch.
"""

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

GROUP = 32
TILE = 16  # outputs per tile of the packed layout
_SOURCE = Path(__file__).with_name("act_int8_linear_cpu.cpp")
# The CPU flags (Linux's names) of the instructions the kernel uses.
_KERNEL_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"}


@functools.cache
def has_kernel() -> bool:
    """Whether this CPU runs the C++ kernel (AVX512-VNNI), rather than the torch path."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return _KERNEL_FLAGS <= flags


@functools.cache
def load_kernel() -> None:
    """Builds (or finds in Inductor's cache, which a server points at its compile cache folder) and loads the
    library that registers the ops' CPU kernels in C++: compiled pieces then call them through the dispatcher
    without Python, where a Python kernel made SmolLM2's batch-1 decode step (121 calls) about 3 ms slower."""
    # Imported here: it pulls in Dynamo and Inductor, which an engine without these layers never needs.
    from torch._inductor.codecache import CppCodeCache

    CppCodeCache.load(_SOURCE.read_text())


def pack_int4(q: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """q [N, K] in 0..15, d and m [N, K / 32] -> (weights uint8 [N / 16, K / 32, 4, 64], d and m float16
    [N / 16, K / 32, 2, 16]), N padded to whole tiles with zero weights (act_int8_linear_cpu.cpp has the layout)."""
    out_features, in_features = q.shape
    if in_features % GROUP or d.shape != (out_features, in_features // GROUP) or m.shape != d.shape:
        raise ValueError(f"int4 x int8 weights need whole groups of {GROUP}: q {tuple(q.shape)}, d {tuple(d.shape)}, m {tuple(m.shape)}")
    q, d, m = (_padded(t) for t in (q, d, m))
    tiles, blocks = q.shape[0] // TILE, in_features // GROUP
    # (tile, lane, block, load, half, input) -> (tile, block, load, half, lane, input)
    v = q.to(torch.uint8).view(tiles, TILE, blocks, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    weights = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).reshape(tiles, blocks, 4, 64).contiguous()
    dm = torch.stack([d.view(tiles, TILE, blocks), m.view(tiles, TILE, blocks)], dim=2).permute(0, 3, 2, 1)
    return weights, dm.to(torch.float16).contiguous()


def unpack_int4(weights: Tensor, dm: Tensor, out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """`pack_int4`'s inverse: (q uint8 [N, K], d and m float32 [N, K / 32])."""
    tiles, blocks = weights.shape[:2]
    halves = torch.stack([weights & 0xF, weights >> 4], dim=3).view(tiles, blocks, 4, 2, TILE, 4)
    q = halves.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, blocks * GROUP)[:out_features]
    d, m = (dm[:, :, i].permute(0, 2, 1).reshape(tiles * TILE, blocks)[:out_features].float() for i in (0, 1))
    return q, d, m


def _padded(t: Tensor) -> Tensor:
    """Rows of zeros up to whole tiles."""
    pad = -t.shape[0] % TILE
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def pack_int8(q: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """q int8 [N, K] in -127..127, scales [N] -> (weights uint8 [N / 16, K / 32, 8, 64] holding q + 128, scales
    float32 [N / 16 * 16]), N padded to whole tiles with zero weights (act_int8_linear_cpu.cpp has the layout)."""
    out_features, in_features = q.shape
    if in_features % GROUP or scales.shape != (out_features,) or (q == -128).any():
        raise ValueError(f"int8 x int8 weights need whole groups of {GROUP}, values in -127..127 and a scale a row: q {tuple(q.shape)}")
    q = _padded(q)
    tiles, blocks = q.shape[0] // TILE, in_features // GROUP
    # (tile, lane, block, load, input) -> (tile, block, load, lane, input)
    v = (q.to(torch.int16) + 128).to(torch.uint8).view(tiles, TILE, blocks, 8, 4).permute(0, 2, 3, 1, 4)
    return v.reshape(tiles, blocks, 8, 64).contiguous(), _padded(scales.float()).contiguous()


def unpack_int8(weights: Tensor, out_features: int) -> Tensor:
    """`pack_int8`'s inverse for the weights: q int8 [N, K]."""
    tiles, blocks = weights.shape[:2]
    q = weights.view(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles * TILE, blocks * GROUP)
    return (q.to(torch.int16) - 128).to(torch.int8)[:out_features]


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] -> (xq int8 [M, K], scales, sums float32 [M, K / 32]), as the kernel rounds: x * (127 / max|x|) in
    float32 to the nearest integer, ties to even."""
    blocks = x.float().view(x.shape[0], -1, GROUP)
    top = blocks.abs().amax(dim=-1)
    # A tensor over a tensor: `127 / top` would multiply by top's reciprocal, another rounding than the kernel's.
    inv = torch.where(top > 0, torch.full_like(top, 127) / top, torch.zeros_like(top))
    xq = torch.round(blocks * inv[..., None]).to(torch.int8).view(x.shape)
    return xq, top / 127, blocks.sum(dim=-1)


def _dequantized_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(s * xq as float32 [M, K], each block's exact sum of x [M, K / 32])."""
    xq, scales, sums = quantize_rows(x)
    return (xq.float().view(x.shape[0], -1, GROUP) * scales[..., None]).view(x.shape), sums


def w4a8_torch(x: Tensor, weights: Tensor, dm: Tensor, out_features: int) -> Tensor:
    """The int4 kernel's arithmetic in float32 torch ops (another order of the float sums)."""
    q, d, m = unpack_int4(weights, dm, out_features)
    x_dq, sums = _dequantized_rows(x)
    w_dq = (q.float().view(out_features, -1, GROUP) * d[..., None]).view(q.shape)
    return (x_dq @ w_dq.T + sums @ m.T).to(x.dtype)


def w8a8_torch(x: Tensor, weights: Tensor, scales: Tensor, out_features: int) -> Tensor:
    """The int8 kernel's arithmetic in float32 torch ops (another order of the float sums)."""
    x_dq, _ = _dequantized_rows(x)
    return ((x_dq @ unpack_int8(weights, out_features).float().T) * scales[:out_features]).to(x.dtype)


_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("linear_w4a8(Tensor x, Tensor weights, Tensor dm, int out_features, Tensor? bias) -> Tensor")
_lib.define("linear_w8a8(Tensor x, Tensor weights, Tensor scales, int out_features, Tensor? bias) -> Tensor")


def _torch_path(what: str, reference: Callable[[Tensor, Tensor, Tensor, int], Tensor], op: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """An op's kernel for every device until the C++ one is loaded for the CPU, which this does on its first
    call where the CPU has one (the C++ registration for the CPU key then takes every later call)."""

    def kernel(x: Tensor, weights: Tensor, params: Tensor, out_features: int, bias: Tensor | None) -> Tensor:
        if x.device.type == "cpu" and has_kernel():
            load_kernel()
            return op(x, weights, params, out_features, bias)
        in_features = weights.shape[1] * GROUP
        if x.dim() != 2 or x.shape[1] != in_features:
            raise ValueError(f"{what} linear of {in_features} inputs got x of shape {list(x.shape)}")
        out = reference(x, weights, params, out_features)
        return out if bias is None else out + bias

    return kernel


_lib.impl("linear_w4a8", _torch_path("int4 x int8", w4a8_torch, torch.ops.kiln.linear_w4a8), "CompositeExplicitAutograd")
_lib.impl("linear_w8a8", _torch_path("int8 x int8", w8a8_torch, torch.ops.kiln.linear_w8a8), "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::linear_w4a8")
def _(x, weights, dm, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake("kiln::linear_w8a8")
def _(x, weights, scales, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


class W4A8Linear(nn.Module):
    def __init__(self, q: Tensor, d: Tensor, m: Tensor, bias: Tensor | None, dtype: torch.dtype):
        """q: [out, in] in 0..15; d, m: [out, in / 32]; w = d * q + m, d and m kept in float16 (a Q4_1
        block's own precision)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        weights, dm = pack_int4(q, d, m)
        self.register_buffer("weights", weights)
        self.register_buffer("dm", dm)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def from_int4(cls, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, dtype: torch.dtype) -> "W4A8Linear":
        """From torch's int4 form, w = (q - 8) * scale + zero (`quant_linear.int4_weights`, `gguf_q4.q4_1_groups`)."""
        return cls(q, scale, zero - 8 * scale, bias, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_w4a8(x, self.weights, self.dm, self.out_features, self.bias)


class W8A8Linear(nn.Module):
    def __init__(self, q: Tensor, scales: Tensor, bias: Tensor | None, dtype: torch.dtype):
        """q: int8 [out, in] in -127..127; scales: [out]; w = q * scale (`quant_linear.int8_weights`' form)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        weights, scales = pack_int8(q, scales)
        self.register_buffer("weights", weights)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_w8a8(x, self.weights, self.scales, self.out_features, self.bias)
