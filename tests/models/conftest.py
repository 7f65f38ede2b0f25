"""Driving a model by hand, without the engine: a small slot pool and the attention metadata for a batch."""

import pytest
import torch

from kiln.ops.attention import AttentionMetadata


class Pool:
    """A small slot pool for driving the model by hand: request i owns slots from i*64+1."""

    def __init__(self, cfg, requests: int):
        shape = (cfg.num_hidden_layers, requests * 64 + 1, cfg.num_key_value_heads, cfg.head_dim)
        self.kv = (torch.zeros(shape), torch.zeros(shape))
        self.table = torch.zeros(requests, 64, dtype=torch.int32)
        for i in range(requests):
            self.table[i] = torch.arange(i * 64 + 1, (i + 1) * 64 + 1)

    def meta(self, rows: list[int], starts: list[int], news: list[int]) -> AttentionMetadata:
        slots = torch.cat([self.table[r, s : s + n] for r, s, n in zip(rows, starts, news)]).long()
        return AttentionMetadata.build(slots, self.table, rows, [s + n for s, n in zip(starts, news)], news)


    def decode_logits(self, model, prompts: list[list[int]], back: int) -> torch.Tensor:
        """One decode step for every request at once: request i feeds prompts[i][-back] over its cached prefix."""
        starts = [len(p) - back for p in prompts]
        ids = torch.tensor([p[s] for p, s in zip(prompts, starts)])
        meta = self.meta(list(range(len(prompts))), starts, [1] * len(prompts))
        with torch.no_grad():
            return model.compute_logits(model(ids, torch.tensor(starts), self.kv, meta))

@pytest.fixture
def kv_pool() -> type[Pool]:
    return Pool
