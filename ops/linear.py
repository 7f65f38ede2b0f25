"""The models' linear layer: oneDNN's or MKL's GEMM for float32 on the CPU, `F.linear` everywhere else.

For float32 on the CPU, ATen and Inductor send every matmul to MKL. On AMD CPUs MKL's
small-M GEMM (decode: one row per request) reads weights at about half the speed of
oneDNN's, and decode is that read; on Intel CPUs MKL wins at one or two rows and
oneDNN from four (measured on a 2-vCPU Xeon with AVX-512, cycling through SmolLM2's
30 layers of weights: 31 vs 40 ms at one row, 63 vs 42 ms at eight). Inductor uses
oneDNN only for weights frozen into the graph as constants, which Kiln's are not
(one compiled piece serves every layer). So on the CPU the GEMM is a custom op,
`kiln::linear`: opaque to Dynamo, it picks the library by row count at run time
inside compiled pieces. On a GPU, and for other dtypes, plain `F.linear` lets
Inductor fuse around cuBLAS.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# Read once: Dynamo does not trace the queries.
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
# Up to this many rows MKL's GEMM is the faster one (Intel only; see above).
_MKL_MAX_ROWS = 2 if _cpu_vendor() == "GenuineIntel" else 0


# Plain define/impl rather than @custom_op, whose Python layers add ~15 us to each of
# the ~120 GEMMs of a decode step.
_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def cpu_float32_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x: [T, in]; weight: [out, in] -> [T, out]."""
    if x.shape[0] <= _MKL_MAX_ROWS or not _HAS_ONEDNN:
        return torch.ops.aten.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")


_lib.impl("linear", cpu_float32_linear, "CPU")


@torch.library.register_fake("kiln::linear")
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, run by `kiln::linear` for 2-D float32 CPU inputs."""
    if _HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.ops.kiln.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and checkpoint names) that calls `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
