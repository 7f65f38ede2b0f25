"""The weight bytes `kiln bench one-batch` counts per step: packed weights at few rows, float32 copies from their
threshold, an embedding table's looked-up rows unless a tied head reads it all."""

import torch
from torch import nn

from kiln.bench.one_batch import weight_bytes_read
from kiln.ops.quant_linear import Int4Linear, int4_weights


def test_weight_bytes_read_follows_the_kernel_each_row_count_uses():
    w = torch.randn(32, 64)
    model = nn.Sequential(nn.Embedding(10, 64), Int4Linear(*int4_weights(w, 32), torch.zeros(32), torch.bfloat16, dense_from_rows=4))
    row = 64 * 4
    bias = 32 * 2
    packed = 32 * 64 // 2 + 2 * 32 * 2 * 2  # 4 bits a weight; a bfloat16 scale and zero per group of 32
    assert weight_bytes_read(model, 1) == row + bias + packed
    assert weight_bytes_read(model, 3) == 3 * row + bias + packed
    assert weight_bytes_read(model, 4) == 4 * row + bias + 32 * 64 * 4


def test_a_tied_head_reads_the_whole_table_once():
    embed, head = nn.Embedding(10, 64), nn.Linear(64, 10, bias=False)
    head.weight = embed.weight
    assert weight_bytes_read(nn.Sequential(embed, head), 1) == 10 * 64 * 4
