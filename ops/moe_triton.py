"""Triton kernel for `kiln::moe`: an align step in torch, then two grouped GEMMs (as SGLang's and vLLM's fused_moe).

The align step sorts the T * top_k (token, expert) pairs by expert and pads each
expert's group to a multiple of BLOCK_M, so every BLOCK_M-row block of the sorted
buffer belongs to one expert. The buffer is sized for the worst case,
T * top_k + E * (BLOCK_M - 1) slots, and the grid covers all of it; blocks past the
last group find expert -1 and return. So no shape depends on the routing and
nothing reads a count on the host: the op can be captured in a CUDA graph.
Pairs of padding rows (row >= num_tokens) go to no block, so they are neither
computed nor counted.

One kernel, `_grouped_gemm`, runs both GEMMs: program (block, n-tile) gathers its
block's A rows, multiplies them by its expert's weight ([N, K] row-major) and
stores the rows back by pair. The first gathers x by token and fuses SiLU(gate) *
up, the second gathers the intermediate by pair and scales by the routing weight.
The top_k rows of each token are summed in float32 at the end. Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors, which is how CI tests it.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from kiln.ops.moe_routing import route


@triton.jit
def _grouped_gemm(
    A, B, C, SortedPairs, BlockExpert, Weights,
    num_pairs, N, K,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    TOP_K: tl.constexpr, GATHER_BY_TOKEN: tl.constexpr, SILU_GATE: tl.constexpr, MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M sorted pairs (one expert) x BLOCK_N output columns.

    C[pair, n] = sum_k A[row(pair), k] * B[expert, n, k]; with SILU_GATE, B's rows N..2N
    are the up projection and C = SiLU(gate) * up.
    """
    block = tl.program_id(0)
    expert = tl.load(BlockExpert + block).to(tl.int64)
    if expert == -1:
        return
    pairs = tl.load(SortedPairs + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = pairs < num_pairs  # empty slots hold the sentinel num_pairs
    rows = pairs
    if GATHER_BY_TOKEN:
        rows = pairs // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    k = tl.arange(0, BLOCK_K)

    a_ptrs = A + rows[:, None] * stride_am + k[None, :] * stride_ak
    b_ptrs = B + expert * stride_be + n[None, :] * stride_bn + k[:, None] * stride_bk  # B^T tile [BLOCK_K, BLOCK_N]
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            gate += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            gate += tl.dot(a, b)
        if SILU_GATE:
            b = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if IEEE:
                up += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                up += tl.dot(a, b)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out = gate
    if SILU_GATE:
        out = gate / (1.0 + tl.exp(-gate)) * up
    if MUL_WEIGHT:
        out = out * tl.load(Weights + pairs, mask=m_mask, other=0.0)[:, None]
    c_ptrs = C + pairs[:, None] * stride_cm + n[None, :] * stride_cn
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


BLOCK_N, BLOCK_K = 64, 32


def _block_m(num_pairs: int, num_experts: int) -> int:
    # Decode-sized batches give each expert a handful of pairs: a 64-row tile would be mostly padding.
    return 16 if num_pairs <= 16 * num_experts else 64


def _align(ids: Tensor, num_tokens: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """ids: [T, top_k] expert ids. Returns (sorted_pairs [P + E * (block_m - 1)] int64, the flat pair
    indices grouped by expert, each group padded to a multiple of block_m with the sentinel P;
    block_expert [cdiv(len, block_m)] int64, -1 past the last group; counts [E] int64, real rows only).
    Torch ops with shapes fixed by (T, top_k, E, block_m) only: no host sync."""
    tokens, top_k = ids.shape
    pairs = tokens * top_k
    slots = pairs + num_experts * (block_m - 1)
    device = ids.device
    real = torch.arange(tokens, device=device) < num_tokens.reshape(-1)[:1]
    # Padding rows' pairs get the dummy expert E: sorted last, counted apart, sent to a dropped slot.
    flat = torch.where(real[:, None], ids, num_experts).flatten()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its size on the host
    sorted_ids, order = torch.sort(flat, stable=True)
    rank = torch.arange(pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_ids]
    padded_end = torch.cumsum((counts[:num_experts] + block_m - 1) // block_m * block_m, 0)
    padded_start = torch.cat([padded_end.new_zeros(1), padded_end])  # entry E unused: the where below
    dest = torch.where(sorted_ids < num_experts, padded_start[sorted_ids] + rank, slots)
    sorted_pairs = torch.full((slots + 1,), pairs, dtype=torch.int64, device=device)
    sorted_pairs.scatter_(0, dest, order)
    block_starts = torch.arange(0, slots, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs[:slots], block_expert, counts[:num_experts]


def _ieee_dots(x: Tensor) -> bool:
    """Float32 gets exact float32 dots (not TF32). So does bfloat16 under the interpreter
    (CPU tensors), whose emulation of bfloat16 dots is wrong in Triton 3.9."""
    return x.dtype == torch.float32 or (x.device.type == "cpu" and x.dtype == torch.bfloat16)


def moe_triton(
    x: Tensor, router_logits: Tensor, w13: Tensor, w2: Tensor, top_k: int, renormalize: bool, num_tokens: Tensor, expert_counts: Tensor
) -> Tensor:
    """x: [T, H]; w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]; expert_counts: [E] int64.
    Rows from `num_tokens` on are padding: zero out, not counted."""
    tokens, hidden = x.shape
    experts, inter = w2.shape[0], w2.shape[2]
    if tokens == 0:
        return torch.zeros_like(x)
    pairs = tokens * top_k
    weights, ids = route(router_logits, top_k, renormalize)  # padding rows too: cheaper than a data-dependent slice
    block_m = _block_m(pairs, experts)
    sorted_pairs, block_expert, counts = _align(ids, num_tokens, experts, block_m)
    expert_counts += counts

    def grouped_gemm(a: Tensor, w: Tensor, n: int, first: bool) -> Tensor:
        """The first GEMM gathers x by token and gates (SiLU(gate) * up); the second scales by the routing weight.
        Rows of padding pairs stay unwritten."""
        c = torch.empty(pairs, n, dtype=x.dtype, device=x.device)
        _grouped_gemm[(block_expert.shape[0], triton.cdiv(n, BLOCK_N))](
            a, w, c, sorted_pairs, block_expert, weights,
            pairs, n, a.shape[1],
            a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
            TOP_K=top_k, GATHER_BY_TOKEN=first, SILU_GATE=first, MUL_WEIGHT=not first,
            BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=_ieee_dots(x),
        )  # fmt: skip
        return c

    y = grouped_gemm(grouped_gemm(x, w13, inter, first=True), w2, hidden, first=False)
    out = y.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32)
    real = torch.arange(tokens, device=x.device) < num_tokens.reshape(-1)[:1]
    # where, not a multiply: padding rows of y are uninitialised memory, maybe NaN
    return torch.where(real[:, None], out, 0.0).to(x.dtype)
