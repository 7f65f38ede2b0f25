"""Triton kernels for attention over the slot pool: KV store, decode (split-K) and extend.

Every kernel gathers K/V through ``req_to_token``, so a request's tokens may sit
anywhere in the pool. No kernel reads a length on the host: grids depend only on
tensor shapes and on host-side counts the caller already holds, so decode can be
captured in a CUDA graph. Under ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors, which is how CI tests them.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(K, V, KCache, VCache, Slots, stride_k, stride_v, stride_c, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Slots + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    k = tl.load(K + t * stride_k + offs, mask=mask)
    v = tl.load(V + t * stride_v + offs, mask=mask)
    tl.store(KCache + slot * stride_c + offs, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + slot * stride_c + offs, v.to(VCache.dtype.element_ty), mask=mask)


@triton.jit
def _scores(q, k, scale_log2, logit_cap, HAS_CAP: tl.constexpr, IEEE: tl.constexpr):
    """q [M, D] @ k [D, N] as base-2 logits, soft-capped when asked."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    if HAS_CAP:
        # cap * tanh(s * scale / cap), with tanh written through exp (the interpreter has no tanh)
        x = s * (scale_log2 * 0.6931471805599453) / logit_cap
        s = logit_cap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * 1.4426950408889634
    else:
        s = s * scale_log2
    return s


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """Folds one tile of base-2 logits s [M, N] and values v [N, D] into the running (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # Rows that have seen only masked keys keep m = -inf; shift them by 0 to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, KCache, VCache, ReqToToken, ReqIdx, SeqLens, MidO, MidLse,
    stride_qt, stride_qh, stride_cs, stride_ch, stride_rt,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    scale_log2, logit_cap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One program: request b, KV head g, split s. All GROUP query heads of g share each K/V tile."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row = tl.load(ReqIdx + b).to(tl.int64)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < GROUP
    d_mask = d < HEAD_DIM
    heads = g * GROUP + h
    q = tl.load(Q + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(KCache.dtype.element_ty)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        slots = tl.load(ReqToToken + row * stride_rt + n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(KCache + slots[None, :] * stride_cs + g * stride_ch + d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = _scores(q, k, scale_log2, logit_cap, HAS_CAP, IEEE)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = tl.load(VCache + slots[:, None] * stride_cs + g * stride_ch + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(MidO + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out, mask=h_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_combine_kernel(
    MidO, MidLse, Out, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_t, stride_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """One program: request b, head h. Merges the splits by their log-sum-exps."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + s)
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits (and empty requests) weigh 0
    o = tl.load(MidO + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :], mask=d_mask[None, :], other=0.0)
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + b * stride_t + h * stride_h + d, res.to(Out.dtype.element_ty), mask=d_mask)


@triton.jit
def _extend_kernel(
    Q, KCache, VCache, Out, ReqToToken, ReqIdx, SeqLens, ExtLens, ExtStarts,
    stride_qt, stride_qh, stride_cs, stride_ch, stride_rt, stride_ot, stride_oh,
    scale_log2, logit_cap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """One program: request b, query head h, block of BLOCK_M new tokens.

    Keys come from the pool (the new tokens' K/V were stored before this runs),
    so the cached prefix and the new tokens are one loop.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    block = tl.program_id(2)
    new = tl.load(ExtLens + b).to(tl.int32)
    if block * BLOCK_M >= new:
        return
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    row = tl.load(ReqIdx + b).to(tl.int64)
    first_row = tl.load(ExtStarts + b).to(tl.int64)
    prefix = seq_len - new
    g = h // GROUP

    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < new
    q_pos = prefix + m
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + (first_row + m)[:, None] * stride_qt + h * stride_qh + d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(KCache.dtype.element_ty)

    lo = 0
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(seq_len, prefix + (block + 1) * BLOCK_M)
        if HAS_WINDOW:
            lo = tl.maximum(prefix + block * BLOCK_M - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        slots = tl.load(ReqToToken + row * stride_rt + n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(KCache + slots[None, :] * stride_cs + g * stride_ch + d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = _scores(q, k, scale_log2, logit_cap, HAS_CAP, IEEE)
        seen = n_mask[None, :]
        if CAUSAL:
            seen = seen & (n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                seen = seen & (q_pos[:, None] - n[None, :] < window)
        s = tl.where(seen, s, float("-inf"))
        v = tl.load(VCache + slots[:, None] * stride_cs + g * stride_ch + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, IEEE)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + (first_row + m)[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _ieee_dots(q: Tensor, cache: Tensor) -> bool:
    """Float32 caches get exact float32 dots (not TF32). So does bfloat16 under the
    interpreter (CPU tensors), whose emulation of bfloat16 dots is wrong in Triton 3.9."""
    return cache.dtype == torch.float32 or (q.device.type == "cpu" and cache.dtype == torch.bfloat16)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: small test batches still get several splits, so tests cover the merge


def store_kv_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor) -> None:
    """k, v: [T, KVH, D] into k_cache, v_cache: [slots, KVH, D] (one layer) at rows `slots`."""
    k, v = k.contiguous(), v.contiguous()
    row = k.shape[1] * k.shape[2]
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0), k_cache.stride(0), ROW=row, BLOCK=triton.next_power_of_2(row)
    )


def decode_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int,
    logit_cap: float,
) -> Tensor:
    """Row b is request b's one new token. Splits the context (flash-decoding) so small
    batches still fill the GPU; the split count depends only on shapes."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    splits = triton.next_power_of_2(max(1, min(16, -(-2 * _multiprocessors(q.device) // max(batch * kv_heads, 1)))))
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_d = _block_d(head_dim)
    mid_o = torch.empty(batch, heads, splits, block_d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    ieee = _ieee_dots(q, k_cache)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, req_to_token, req_indices, seq_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale * LOG2E, logit_cap, sliding_window,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=64, NUM_SPLITS=splits, HAS_CAP=logit_cap > 0, HAS_WINDOW=sliding_window > 0, IEEE=ieee,
        num_warps=4, num_stages=3,
    )  # fmt: skip
    _decode_combine_kernel[(batch, heads)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=splits,
    )  # fmt: skip
    return out


def extend_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    extend_lens: Tensor,
    extend_starts: Tensor,
    max_extend_len: int,
    scale: float,
    causal: bool,
    sliding_window: int,
    logit_cap: float,
) -> Tensor:
    """Each request's new tokens over its cached prefix and themselves; padding rows come out zero."""
    heads, head_dim = q.shape[1], q.shape[2]
    out = torch.zeros_like(q)
    batch = req_indices.shape[0]
    if batch == 0 or max_extend_len == 0:
        return out
    # Tiles from a sweep on an H200 (docs/performance.md); the interpreter gets small ones.
    block_m = (128 if head_dim <= 128 else 64) if q.is_cuda else 16
    ieee = _ieee_dots(q, k_cache)
    _extend_kernel[(batch, heads, triton.cdiv(max_extend_len, block_m))](
        q, k_cache, v_cache, out, req_to_token, req_indices, seq_lens, extend_lens, extend_starts,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, logit_cap, sliding_window,
        GROUP=heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=64 if q.is_cuda else 16,
        BLOCK_D=_block_d(head_dim), CAUSAL=causal, HAS_CAP=logit_cap > 0, HAS_WINDOW=sliding_window > 0, IEEE=ieee,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
