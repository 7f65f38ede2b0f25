"""Suite-wide set-up that must happen before any test module imports Kiln."""

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors.
# `@triton.jit` reads this when a kernel is defined, so it is set before anything
# imports kiln.ops (importing torch._dynamo already imports triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
