"""Pooling of per-token hidden states into one vector per request, and where its settings come from.

Rows of a batch are the requests' tokens back to back (see ops/attention.py), so a request
is a span of rows given by its length; pooled requests are always computed whole.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

POOLING_METHODS = ("mean", "cls", "last")
# sentence-transformers' 1_Pooling/config.json flags, in the order they are checked.
_ST_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}


@dataclass
class PoolingConfig:
    method: str  # one of POOLING_METHODS
    normalize: bool


def read_pooling_config(folder: Path, default: PoolingConfig, method: str | None, normalize: bool | None) -> PoolingConfig:
    """The checkpoint's sentence-transformers files when present, else `default`; `method`/`normalize` override both."""
    found = PoolingConfig(default.method, default.normalize)
    modules_file = folder / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        found.normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith(".Pooling"):
                st = json.loads((folder / m.get("path", "") / "config.json").read_text())
                modes = [name for flag, name in _ST_FLAGS.items() if st.get(flag)]
                if len(modes) != 1 or any(st.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
                    raise ValueError(f"{folder}: unsupported sentence-transformers pooling {st}; pass --pooling-method")
                found.method = modes[0]
    return PoolingConfig(method or found.method, found.normalize if normalize is None else normalize)


def span_rows(lens: list[int], which: str, device: torch.device) -> Tensor:
    """Row index of each request's first ("cls") or last ("last") token."""
    ends = torch.tensor(lens, device=device).cumsum(0)
    return ends - torch.tensor(lens, device=device) if which == "cls" else ends - 1


def pool(hidden: Tensor, lens: list[int], cfg: PoolingConfig) -> Tensor:
    """[T, H] hidden states (T >= sum(lens)) → [B, H] float32, one row per request."""
    if cfg.method == "mean":
        # Each row adds into its request's sum; padding rows past sum(lens) are left out.
        owner = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), torch.tensor(lens, device=hidden.device))
        sums = hidden.new_zeros(len(lens), hidden.shape[-1], dtype=torch.float32)
        sums.index_add_(0, owner, hidden[: owner.shape[0]].float())
        out = sums / torch.tensor(lens, device=hidden.device, dtype=torch.float32)[:, None]
    else:
        out = hidden[span_rows(lens, cfg.method, hidden.device)].float()
    return F.normalize(out, dim=-1) if cfg.normalize else out
