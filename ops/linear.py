"""The models' linear layer: oneDNN's GEMM for float32 on the CPU, `F.linear` everywhere else.

For float32 on the CPU, ATen and Inductor send every matmul to MKL, whose small-M GEMM
(decode: one row per request) reads weights at about half the speed of oneDNN's on AMD
CPUs, and decode is that read. Inductor uses oneDNN only for weights frozen into the
graph as constants, which Kiln's are not (one compiled piece serves every layer). So on
the CPU the GEMM is a custom op, `kiln::linear`: opaque to Dynamo, it runs as it is
inside compiled pieces. On a GPU, and for other dtypes, plain `F.linear` lets Inductor
fuse around cuBLAS.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Read once: Dynamo does not trace the query.
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


# Plain define/impl rather than @custom_op, whose Python layers add ~15 us to each of
# the ~120 GEMMs of a decode step.
_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x: [T, in]; weight: [out, in] -> [T, out]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [None], "")


_lib.impl("linear", _onednn_linear, "CPU")


@torch.library.register_fake("kiln::linear")
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, run by oneDNN for 2-D float32 CPU inputs."""
    if _HAS_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.ops.kiln.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and checkpoint names) that calls `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
