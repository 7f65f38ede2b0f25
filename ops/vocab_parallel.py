"""Vocabulary-parallel embedding and LM head: each rank holds `TensorParallel.vocab_range` rows of the
[vocab, hidden] table (the same rows for both, so tied weights stay one tensor).

The embedding looks up the ids in its rows, zeroes the others and all-reduces, so every rank gets every
token's full vector (exact: one rank adds the row, the others add zeros). The LM head computes its rows'
logits and all-gathers them; the last rank's padding columns are cut off. At size 1 both are exactly
`nn.Embedding` and `Linear` plus the float32 cast.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.ops.collectives import all_gather_columns, all_reduce
from kiln.ops.tensor_parallel import TensorParallel


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__(tp.vocab_rows(vocab_size), hidden_size)
        self.tp = tp
        self.first = tp.vocab_range(vocab_size).start

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.tp.size == 1:
            return super().forward(input_ids)
        local = input_ids - self.first
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce(x.masked_fill(~mine.unsqueeze(-1), 0), self.tp)


def vocab_parallel_logits(lm_head: nn.Module, hidden: Tensor, vocab_size: int, tp: TensorParallel) -> Tensor:
    """Full-vocabulary float32 logits on every rank from a head holding this rank's vocabulary rows (dense
    `Linear` or a quantized one)."""
    logits = lm_head(hidden).float()
    if tp.size == 1:
        return logits
    return all_gather_columns(logits, tp)[:, :vocab_size]

