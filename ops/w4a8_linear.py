"""int4 weights against int8 activations (torchao's "8da4w"): the arithmetic llama.cpp does with a Q4_1 GGUF.

`W4A8Linear` holds int4 weights in groups of 32, w = d * q + m (a GGUF Q4_1 block as it is, d and m in float16).
Each call quantizes its input per row and block of 32 to int8 (x ~ s * xq, s = max|x| / 127) and sums
d * s * (q . xq) + m * sum(x) over the blocks: the q . xq are integer dot products, which AVX512-VNNI's vpdpbusd
does 64 at a time (w4a8_linear_cpu.cpp). Torch's int4 kernel instead turns every weight into a float32 and does
one FMA a weight; it is bound by that arithmetic from a few rows up. SmolLM2's 120 projections, 2-vCPU AVX-512
Xeon, bfloat16: 1 row 4.2 ms against 4.6 (both near the memory bound), 8 rows 6.5 against 14.6, 32 rows 20.9
against 57.6.

The price is the activations' rounding: a block's error is at most half of max|x| / 127 an input (the
weights' own rounding is the GGUF's). tests/ops/test_w4a8_linear.py states the tolerance against the
de-quantized weights, and tests/models/test_quantize.py the perplexity.

The op `kiln::linear_w4a8` is opaque to Dynamo, like `kiln::linear`; its CPU kernel is registered in C++ by the
kernel's library, so a compiled piece calls it without Python. On a CPU without AVX512-VNNI it runs
`w4a8_torch`, the same arithmetic in torch ops (slow: a float copy of the weights every call), which is also the
reference the kernel is tested against. A row's result never depends on the other rows of its batch.
"""

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

GROUP = 32
TILE = 16  # outputs per tile of the packed layout
_SOURCE = Path(__file__).with_name("w4a8_linear_cpu.cpp")
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
    library that registers the op's CPU kernel in C++: compiled pieces then call it through the dispatcher without
    Python, where a Python kernel costs about 15 us a call, 120 calls a decode step of SmolLM2."""
    # Imported here: it pulls in Dynamo and Inductor, which an engine without these layers never needs.
    from torch._inductor.codecache import CppCodeCache

    CppCodeCache.load(_SOURCE.read_text())


def pack(q: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """q [N, K] in 0..15, d and m [N, K / 32] -> (weights uint8 [N / 16, K / 32, 4, 64], d and m float16
    [N / 16, K / 32, 2, 16]), N padded to whole tiles with zero weights (w4a8_linear_cpu.cpp has the layout)."""
    out_features, in_features = q.shape
    if in_features % GROUP or d.shape != (out_features, in_features // GROUP) or m.shape != d.shape:
        raise ValueError(f"int4 x int8 weights need whole groups of {GROUP}: q {tuple(q.shape)}, d {tuple(d.shape)}, m {tuple(m.shape)}")
    pad = -out_features % TILE
    q, d, m = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t for t in (q, d, m))
    tiles, blocks = q.shape[0] // TILE, in_features // GROUP
    # (tile, lane, block, load, half, input) -> (tile, block, load, half, lane, input)
    v = q.to(torch.uint8).view(tiles, TILE, blocks, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
    weights = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).reshape(tiles, blocks, 4, 64).contiguous()
    dm = torch.stack([d.view(tiles, TILE, blocks), m.view(tiles, TILE, blocks)], dim=2).permute(0, 3, 2, 1)
    return weights, dm.to(torch.float16).contiguous()


def unpack(weights: Tensor, dm: Tensor, out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """`pack`'s inverse: (q uint8 [N, K], d and m float32 [N, K / 32])."""
    tiles, blocks = weights.shape[:2]
    halves = torch.stack([weights & 0xF, weights >> 4], dim=3).view(tiles, blocks, 4, 2, TILE, 4)
    q = halves.permute(0, 4, 1, 2, 3, 5).reshape(tiles * TILE, blocks * GROUP)[:out_features]
    d, m = (dm[:, :, i].permute(0, 2, 1).reshape(tiles * TILE, blocks)[:out_features].float() for i in (0, 1))
    return q, d, m


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [M, K] -> (xq int8 [M, K], scales, sums float32 [M, K / 32]), as the kernel rounds: x * (127 / max|x|) in
    float32 to the nearest integer, ties to even."""
    blocks = x.float().view(x.shape[0], -1, GROUP)
    top = blocks.abs().amax(dim=-1)
    # A tensor over a tensor: `127 / top` would multiply by top's reciprocal, another rounding than the kernel's.
    inv = torch.where(top > 0, torch.full_like(top, 127) / top, torch.zeros_like(top))
    xq = torch.round(blocks * inv[..., None]).to(torch.int8).view(x.shape)
    return xq, top / 127, blocks.sum(dim=-1)


def w4a8_torch(x: Tensor, weights: Tensor, dm: Tensor, out_features: int) -> Tensor:
    """The kernel's arithmetic in float32 torch ops (another order of the float sums)."""
    q, d, m = unpack(weights, dm, out_features)
    xq, scales, sums = quantize_rows(x)
    x_dq = (xq.float().view(x.shape[0], -1, GROUP) * scales[..., None]).view(x.shape)
    w_dq = (q.float().view(out_features, -1, GROUP) * d[..., None]).view(q.shape)
    return (x_dq @ w_dq.T + sums @ m.T).to(x.dtype)


_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("linear_w4a8(Tensor x, Tensor weights, Tensor dm, int out_features, Tensor? bias) -> Tensor")


def _linear_w4a8(x: Tensor, weights: Tensor, dm: Tensor, out_features: int, bias: Tensor | None) -> Tensor:
    """Every device's kernel until the C++ one is loaded for the CPU, which this does on its first call where
    the CPU has one (the C++ registration for the CPU key then takes every later call)."""
    if x.device.type == "cpu" and has_kernel():
        load_kernel()
        return torch.ops.kiln.linear_w4a8(x, weights, dm, out_features, bias)
    in_features = weights.shape[1] * GROUP
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"int4 x int8 linear of {in_features} inputs got x of shape {list(x.shape)}")
    out = w4a8_torch(x, weights, dm, out_features)
    return out if bias is None else out + bias


_lib.impl("linear_w4a8", _linear_w4a8, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::linear_w4a8")
def _(x, weights, dm, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


class W4A8Linear(nn.Module):
    def __init__(self, q: Tensor, d: Tensor, m: Tensor, bias: Tensor | None, dtype: torch.dtype):
        """q: [out, in] in 0..15; d, m: [out, in / 32]; w = d * q + m, d and m kept in float16 (a Q4_1
        block's own precision)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        weights, dm = pack(q, d, m)
        self.register_buffer("weights", weights)
        self.register_buffer("dm", dm)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.kiln.linear_w4a8(x, self.weights, self.dm, self.out_features, self.bias)
