"""Ragged slot-pool batches shared by the attention tests."""

from dataclasses import dataclass

import pytest
import torch


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]: each request's new tokens, then padding rows
    k_new: torch.Tensor  # [T, KVH, D]
    v_new: torch.Tensor
    k_cache: torch.Tensor  # [layers, slots, KVH, D]: prefixes already stored in `layer`
    v_cache: torch.Tensor
    layer: int
    table: torch.Tensor  # req_to_token
    out_slots: torch.Tensor
    req_indices: torch.Tensor
    seq_lens: torch.Tensor
    extend_lens: torch.Tensor
    extend_starts: torch.Tensor
    new_rows: int  # rows that belong to requests; the rest are padding

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's caches with the new K/V written in, as attention sees them."""
        k, v = self.k_cache[self.layer].clone(), self.v_cache[self.layer].clone()
        k[self.out_slots] = self.k_new.to(k.dtype)
        v[self.out_slots] = self.v_new.to(v.dtype)
        k[0] = 0
        v[0] = 0
        return k, v


def _make_batch(
    reqs: list[tuple[int, int]],
    pad: int = 0,
    pad_reqs: int = 0,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Batch:
    """reqs: (cached prefix, new tokens) per request, in scattered pool slots; then `pad`
    padding rows and `pad_reqs` padding requests (no tokens), as a compiled bucket adds them."""
    g = torch.Generator().manual_seed(seed)
    layers, layer = 2, 1
    total = sum(p + n for p, n in reqs)
    k_cache = torch.zeros(layers, total + 1, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    width = max([p + n for p, n in reqs] + [1])
    table = torch.zeros(len(reqs) + 1, width + 3, dtype=torch.int32)
    perm = (torch.randperm(total, generator=g) + 1).tolist()
    out_slots = []
    for i, (prefix, new) in enumerate(reqs):
        slots = [perm.pop() for _ in range(prefix + new)]
        table[i + 1, : prefix + new] = torch.tensor(slots, dtype=torch.int32)
        k_cache[layer, slots[:prefix]] = torch.randn(prefix, kv_heads, head_dim, generator=g).to(dtype)
        v_cache[layer, slots[:prefix]] = torch.randn(prefix, kv_heads, head_dim, generator=g).to(dtype)
        out_slots += slots[prefix:]
    rows = sum(n for _, n in reqs)
    q = torch.randn(rows + pad, heads, head_dim, generator=g).to(dtype)
    k_new = torch.randn(rows + pad, kv_heads, head_dim, generator=g).to(dtype)
    v_new = torch.randn(rows + pad, kv_heads, head_dim, generator=g).to(dtype)
    news = [n for _, n in reqs] + [0] * pad_reqs
    starts = torch.tensor([0] + news[:-1]).cumsum(0)
    return Batch(
        q, k_new, v_new, k_cache, v_cache, layer, table,
        out_slots=torch.tensor(out_slots + [0] * pad, dtype=torch.int64),
        req_indices=torch.tensor(list(range(1, len(reqs) + 1)) + [0] * pad_reqs),
        seq_lens=torch.tensor([p + n for p, n in reqs] + [0] * pad_reqs),
        extend_lens=torch.tensor(news),
        extend_starts=starts,
        new_rows=rows,
    )  # fmt: skip


@pytest.fixture(scope="session")
def make_batch():
    return _make_batch
