"""Attention kernels on CUDA: decode bandwidth against the device's measured peak, extend time and TFLOP/s.

    python -m kiln.bench.attention [--batch 32] [--context 4096] [--heads 32] [--kv-heads 8] [--head-dim 128]

The peak is measured here, by a large device-to-device copy (bytes read plus
written over its time). Decode reads every cached K and V once, so its floor is
that many bytes at the peak. The peer is torch's SDPA on the same K/V laid out
densely ([batch, heads, context, dim], no slot table), timed in the same run.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kiln.ops.attention_triton import decode_triton, extend_triton


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() / (ms / 1e3)


def pool(batch: int, context: int, kv_heads: int, head_dim: int, dtype: torch.dtype, scattered: bool):
    slots = batch * context
    k = torch.randn(slots + 1, kv_heads, head_dim, dtype=dtype, device="cuda")
    v = torch.randn_like(k)
    order = torch.randperm(slots, device="cuda") if scattered else torch.arange(slots, device="cuda")
    table = (order + 1).to(torch.int32).view(batch, context)
    return k, v, table


def bench_decode(args, dtype: torch.dtype, peak: float, scattered: bool) -> dict:
    b, ctx, h, kvh, d = args.batch, args.context, args.heads, args.kv_heads, args.head_dim
    k, v, table = pool(b, ctx, kvh, d, dtype, scattered)
    q = torch.randn(b, h, d, dtype=dtype, device="cuda")
    rows = torch.arange(b, device="cuda")
    lens = torch.full((b,), ctx, device="cuda")
    ms = do_bench(lambda: decode_triton(q, k, v, table, rows, lens, d**-0.5, 0, 0.0), warmup=25, rep=200)
    moved = 2 * b * ctx * kvh * d * k.element_size() + 2 * q.numel() * q.element_size() + table.numel() * 4
    dense_k = k[table.long()].permute(0, 2, 1, 3).contiguous()  # [B, KVH, ctx, D]
    dense_v = v[table.long()].permute(0, 2, 1, 3).contiguous()
    sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(q[:, :, None], dense_k, dense_v, enable_gqa=True), warmup=25, rep=200)
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), dense_k.float(), dense_v.float(), enable_gqa=True)[:, :, 0]
    err = (decode_triton(q, k, v, table, rows, lens, d**-0.5, 0, 0.0).float() - ref).abs().max().item()
    return {
        "kernel": "decode", "slots": "scattered" if scattered else "contiguous", "ms": round(ms, 4),
        "GB_s": round(moved / (ms / 1e3) / 1e9, 1), "fraction_of_peak": round(moved / (ms / 1e3) / peak, 3),
        "sdpa_dense_ms": round(sdpa_ms, 4), "kiln_vs_sdpa": round(sdpa_ms / ms, 2), "max_abs_err_vs_fp32": round(err, 5),
    }  # fmt: skip


def bench_extend(args, dtype: torch.dtype) -> dict:
    reqs, new, prefix, h, kvh, d = 4, args.extend_tokens, args.extend_prefix, args.heads, args.kv_heads, args.head_dim
    total = new + prefix
    k, v, table = pool(reqs, total, kvh, d, dtype, scattered=False)
    q = torch.randn(reqs * new, h, d, dtype=dtype, device="cuda")
    lens = torch.full((reqs,), total, device="cuda")
    ext = torch.full((reqs,), new, device="cuda")
    starts = torch.arange(reqs, device="cuda") * new
    rows = torch.arange(reqs, device="cuda")
    ms = do_bench(lambda: extend_triton(q, k, v, table, rows, lens, ext, starts, new, d**-0.5, True, 0, 0.0), warmup=10, rep=50)
    seen = reqs * (new * prefix + new * (new + 1) / 2)  # (query, key) pairs under the causal mask
    flops = 4 * seen * h * d
    dense_k = k[table.long()].permute(0, 2, 1, 3).contiguous()
    dense_v = v[table.long()].permute(0, 2, 1, 3).contiguous()
    dense_q = q.view(reqs, new, h, d).transpose(1, 2)
    mask = torch.ones(new, total, dtype=torch.bool, device="cuda").tril(prefix)
    sdpa_ms = do_bench(lambda: F.scaled_dot_product_attention(dense_q, dense_k, dense_v, attn_mask=mask, enable_gqa=True), warmup=10, rep=50)
    return {
        "kernel": "extend", "requests": reqs, "new_tokens": new, "prefix": prefix, "ms": round(ms, 3),
        "TFLOP_s": round(flops / (ms / 1e3) / 1e12, 1), "sdpa_dense_ms": round(sdpa_ms, 3), "kiln_vs_sdpa": round(sdpa_ms / ms, 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--extend-tokens", type=int, default=1024)
    ap.add_argument("--extend-prefix", type=int, default=3072)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    peak = copy_bandwidth()
    out = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_peak_GB_s": round(peak / 1e9, 1), "shape": vars(args), "results": []}
    out["results"].append(bench_decode(args, dtype, peak, scattered=False))
    out["results"].append(bench_decode(args, dtype, peak, scattered=True))
    out["results"].append(bench_extend(args, dtype))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
