"""kiln::attention against a dense per-request reference, on ragged mixed batches."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kiln.ops.attention import attention


def reference(q_new, k_all, v_all, n_new, scale):
    """Dense causal attention of one request's new tokens over all its tokens."""
    heads, kv_heads = q_new.shape[1], k_all.shape[1]
    k = k_all.repeat_interleave(heads // kv_heads, dim=1)
    v = v_all.repeat_interleave(heads // kv_heads, dim=1)
    total = k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q_new, k) * scale
    q_pos = torch.arange(total - n_new, total)[:, None]
    scores = scores.masked_fill(torch.arange(total)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@settings(max_examples=25, deadline=None)
@example(reqs=[(3, 1), (0, 1), (5, 1)], pad=2, pad_reqs=2, group=3, head_dim=8)  # a padded decode bucket
@example(reqs=[(3, 1), (6, 1)], pad=0, pad_reqs=0, group=1, head_dim=16)  # plain decode
@given(
    reqs=st.lists(st.tuples(st.integers(0, 12), st.integers(1, 9)), min_size=1, max_size=5),
    pad=st.integers(0, 3),
    pad_reqs=st.integers(0, 2),
    group=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([8, 16]),
)
def test_matches_dense_reference(reqs, pad, pad_reqs, group, head_dim):
    """reqs: (cached prefix length, new tokens) per request; then `pad` padding rows and `pad_reqs`
    padding requests (no tokens, as a compiled bucket adds them)."""
    torch.manual_seed(0)
    kv_heads, layers, layer = 2, 2, 1
    heads = kv_heads * group
    slots_total = sum(p + n for p, n in reqs) + 1
    k_cache = torch.zeros(layers, slots_total, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    table = torch.zeros(len(reqs) + 1, 32, dtype=torch.int32)
    perm = (torch.randperm(slots_total - 1) + 1).tolist()  # slots scattered over the pool

    full_k, full_v, q_rows, out_slots = [], [], [], []
    for i, (prefix, new) in enumerate(reqs):
        slots = [perm.pop() for _ in range(prefix + new)]
        table[i + 1, : prefix + new] = torch.tensor(slots, dtype=torch.int32)
        k = torch.randn(prefix + new, kv_heads, head_dim)
        v = torch.randn(prefix + new, kv_heads, head_dim)
        k_cache[layer, slots[:prefix]] = k[:prefix]
        v_cache[layer, slots[:prefix]] = v[:prefix]
        full_k.append(k)
        full_v.append(v)
        q_rows.append(torch.randn(new, heads, head_dim))
        out_slots += slots[prefix:]

    q = torch.cat(q_rows + [torch.randn(pad, heads, head_dim)])
    k_new = torch.cat([k[p:] for k, (p, _) in zip(full_k, reqs)] + [torch.randn(pad, kv_heads, head_dim)])
    v_new = torch.cat([v[p:] for v, (p, _) in zip(full_v, reqs)] + [torch.randn(pad, kv_heads, head_dim)])
    out_slots = torch.tensor(out_slots + [0] * pad)
    scale = head_dim**-0.5

    out = attention(
        q, k_new, v_new, k_cache, v_cache, layer, out_slots, table,
        torch.tensor(list(range(1, len(reqs) + 1)) + [0] * pad_reqs),
        torch.tensor([p + n for p, n in reqs] + [0] * pad_reqs),
        torch.tensor([n for _, n in reqs] + [0] * pad_reqs),
        scale, True,
    )  # fmt: skip

    start = 0
    for (prefix, new), qr, k, v in zip(reqs, q_rows, full_k, full_v):
        torch.testing.assert_close(out[start : start + new], reference(qr, k, v, new, scale), atol=1e-5, rtol=1e-5)
        start += new
    assert torch.all(out[start:] == 0), "padding rows must produce zeros"
    # New K/V landed in their slots; the other layer was untouched.
    torch.testing.assert_close(k_cache[layer, out_slots[: start]], k_new[:start])
    assert torch.all(k_cache[0] == 0)


def test_fake_impl_keeps_shape_under_compile_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(5, 4, 8)
        k = torch.empty(5, 2, 8)
        cache = torch.empty(1, 10, 2, 8)
        idx = torch.zeros(5, dtype=torch.int64)
        out = torch.ops.kiln.attention(q, k, k, cache, cache, 0, idx, torch.zeros(2, 8, dtype=torch.int32), idx[:1], idx[:1], idx[:1], 1.0, True)
    assert out.shape == (5, 4, 8)
