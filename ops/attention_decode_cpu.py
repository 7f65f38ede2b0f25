"""Decode attention that reads the slot pool in place on the CPU: a C++ kernel, for compiled models.

`decode_torch` gathers each request's K/V out of the pool (and, without native bfloat16, converts them to
float32) before SDPA: at batch 32 over 1,000 tokens that copying is most of the attention time. The kernel in
attention_decode_cpu.cpp loads each K/V row straight from the pool, converts it in registers and uses it for
every query head of its group at once, with an online softmax over blocks of keys and a request's context
split into chunks when there are fewer (request, KV head) pairs than threads want. An earlier version written
as torch math for Inductor ran 3-10x slower (`kiln bench cpu-attention`'s shapes): Inductor's loop nest dotted
each K row once per query head, in vectors with a horizontal sum each.

The compiler lowers `kiln::attention` to it (see compiler/piecewise.py); eager models keep SDPA. One build per
dtype and head shape serves every batch and context width. It is built by Inductor's C++ toolchain (the flags
and vector ISA Inductor picks for this CPU) into Inductor's cache, which a server points at its compile cache
folder: a warm start loads the built library instead of compiling it. attention_cpu_op.cpp launches a built
kernel (how many chunks, their scratch) for both `decode_inplace` here and the op's own decode steps.
"""

import ctypes
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_suffix(".cpp")
_OP_SOURCE = Path(__file__).with_name("attention_cpu_op.cpp")
_CPP_TYPES = {torch.float32: "float", torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}
_ARG_TYPES = [
    *("const q_t*", "const kv_t*", "const kv_t*", "const int32_t*", "const int64_t*", "const int64_t*", "q_t*", "float*"),
    *("const q_t*", "const q_t*", "const int64_t*"),
    *("int64_t", "int64_t", "int64_t", "int64_t", "float", "int64_t", "float", "int64_t", "int64_t", "int64_t"),
]
_NOTHING = torch.empty(0)

# (q dtype, heads, head dim, KV heads, pool dtype) -> the built kernel's Python binding, held so that each
# variant is built once and its library stays loaded: attention_cpu_op.cpp launches it by address.
_kernels: dict[tuple[object, ...], Callable[..., None]] = {}


def _variant(q: Tensor, k_cache: Tensor) -> tuple[object, ...]:
    return (q.dtype, q.shape[-2], q.shape[-1], k_cache.shape[1], k_cache.dtype)


def _build(key: tuple[object, ...]) -> Callable[..., None]:
    q_dtype, heads, dim, kv_heads, kv_dtype = key
    if q_dtype not in _CPP_TYPES or kv_dtype not in _CPP_TYPES or heads % kv_heads:
        raise ValueError(f"CPU decode attention has no kernel for {heads} heads over {kv_heads} KV heads, q {q_dtype}, K/V {kv_dtype}")
    head = (
        # cpp_prefix.h includes at::vec only when Inductor picked a vector ISA; a CPU without one gets its scalar form.
        "#include <torch/csrc/inductor/cpp_prefix.h>\n#include <ATen/cpu/vec/functional.h>\n"
        f"using q_t = {_CPP_TYPES[q_dtype]};\nusing kv_t = {_CPP_TYPES[kv_dtype]};\n"
        f"constexpr int64_t KVH = {kv_heads}, G = {heads // kv_heads}, D = {dim};\n"
    )
    # Imported here: it pulls in Dynamo and Inductor (about 1.5 s), which an eager server never needs and a
    # compiled one imports beside its weight loading.
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return CppPythonBindingsCodeCache.load_pybinding(_ARG_TYPES, head + _SOURCE.read_text())


def _kernel(q: Tensor, k_cache: Tensor) -> Callable[..., None]:
    key = _variant(q, k_cache)
    fn = _kernels.get(key)
    if fn is None:
        fn = _kernels[key] = _build(key)
        _load_op()
        # The C++ op calls the built kernel by its address; the module that binds it for Python stays loaded.
        address = ctypes.cast(ctypes.CDLL(fn.__self__.__file__).kernel, ctypes.c_void_p).value
        torch.ops.kiln.register_cpu_decode(q.new_empty(q.shape[-2:]), k_cache[:1], address)
    return fn


@functools.cache
def _load_op() -> None:
    """Loads kiln::attention's C++ kernel for the CPU (attention_cpu_op.cpp), which runs the built kernels of
    compiled models' decode steps without Python; built once into Inductor's cache, like the kernels."""
    from torch._inductor.codecache import CppCodeCache

    CppCodeCache.load(_OP_SOURCE.read_text())


def decode_inplace(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    req_to_token: Tensor,
    req_indices: Tensor,
    seq_lens: Tensor,
    scale: float,
    sliding_window: int,
    logit_cap: float,
    new_kv: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """decode_torch's contract (row b is request b's one new token), reading K/V where they lie: q [B, H, D];
    caches [slots, KVH, D], rows contiguous; req_to_token int32. `new_kv` = (k, v, out_slots): this step's
    K/V rows [B, KVH, D], in q's dtype, stored at `out_slots` by the kernel itself before it attends (the
    Python and dispatch of a separate store cost more than the copy)."""
    if req_to_token.dtype != torch.int32 or req_to_token.stride(1) != 1 or req_indices.dtype != torch.int64 or seq_lens.dtype != torch.int64:
        raise ValueError("CPU decode attention reads an int32 slot table with contiguous rows, int64 request rows and lengths")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("CPU decode attention reads contiguous K/V caches")
    batch, _, dim = q.shape
    kv_heads = k_cache.shape[1]
    k, v, slots = (_NOTHING, _NOTHING, _NOTHING) if new_kv is None else new_kv
    if new_kv is not None:
        row = (kv_heads, dim)
        if k.dtype != q.dtype or v.dtype != q.dtype or k.shape[1:] != row or v.shape[1:] != row or k.shape[0] != batch or v.shape[0] != batch:
            raise ValueError(f"CPU decode attention stores K/V rows {tuple(row)} in q's dtype, one per request")
        if k.stride()[1:] != (dim, 1) or v.stride()[1:] != (dim, 1) or slots.dtype != torch.int64 or slots.shape != (batch,):
            raise ValueError("CPU decode attention stores K/V rows contiguous within a row at one int64 slot per request")
    _kernel(q, k_cache)  # built, and registered with the C++ op that launches it
    stores = 0 if new_kv is None else batch
    return torch.ops.kiln.decode_inplace_cpu(
        q, k_cache, v_cache, req_to_token, req_indices, seq_lens, scale, sliding_window, logit_cap, k, v, slots, stores
    )


def prepare_decode(q: Tensor, k_cache: Tensor) -> int:
    """The kernel for one layer kind, ready before serving: built, or loaded when Inductor's cache (the
    server's compile cache folder) holds it from an earlier start. Returns 1 if loaded, 0 if built. q is [H, D]
    in the model's dtype; k_cache one layer of the pool."""
    t0 = time.time()
    fn = _kernel(q, k_cache)
    return int(os.path.getmtime(fn.__self__.__file__) < t0)  # its module's file is the built library
