"""The persistent compile cache: one folder per key, the key hashing all that shapes a graph."""

import hashlib
import json
import os
from pathlib import Path

import torch

import kiln
from kiln.compiler.profile import Profile

# The source files Dynamo traces or that decide how pieces are cut and compiled.
TRACED_PACKAGES = ("models", "ops", "compiler")


def device_fingerprint(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return torch.backends.cpu.get_cpu_capability()


def cache_key(model_config: dict, dtype: torch.dtype, device: torch.device, profile: Profile) -> str:
    h = hashlib.sha256()
    root = Path(kiln.__file__).resolve().parent
    for package in TRACED_PACKAGES:
        for f in sorted((root / package).glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    factors = {
        "config": model_config,
        "dtype": str(dtype),
        "device": device.type,
        "device_fingerprint": device_fingerprint(device),
        "profile": profile.source,
        "torch": torch.__version__,
        "triton": triton_version,
        "kiln": kiln.__version__,
    }
    h.update(json.dumps(factors, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def use_cache_dir(path: Path, compiling: bool = True) -> None:
    """Points Inductor's on-disk caches at `path`; called once, before anything compiles. With `compiling`
    off (an eager engine, which only builds kernel libraries) Inductor is not imported."""
    path.mkdir(parents=True, exist_ok=True)
    # Inductor takes its cache location only from this variable; set once at start-up, from ServerArgs.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    if not compiling:
        return
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
