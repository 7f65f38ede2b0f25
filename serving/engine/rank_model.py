"""What every tensor-parallel rank builds the same way: the model (this rank's shard), the KV pool, the compiled forward.

Rank 0's EngineCore and the other ranks' workers (tp_worker.py) both call `build_rank_model`, so that every
collective in it (the pool size's agreement, warm-up forwards, CUDA graph captures) comes in the same order
on every rank.
"""

import importlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from kiln.compiler.cache import cache_key, use_cache_dir
from kiln.compiler.cuda_graphs import probe_graph_memory
from kiln.compiler.profile import Profile
from kiln.models.config import ModelConfig
from kiln.models.dummy import dummy_config_folder
from kiln.models.gguf_q4 import GGUFQ4_1
from kiln.models.loader import gguf_file, load_model, quantize_model, resolve_checkpoint
from kiln.models.quantize import INT8_ACTIVATION_MODES
from kiln.ops.act_int8_linear import has_kernel, load_kernel
from kiln.ops.tensor_parallel import TensorParallel
from kiln.serving.engine.device import available_memory, resolve_quantization
from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.server_args import ServerArgs

if TYPE_CHECKING:  # imported where it compiles: it pulls in Dynamo and Inductor, which an eager server never needs
    from kiln.compiler.compiled_model import CompiledModel

log = logging.getLogger(__name__)


def locate_checkpoint(args: ServerArgs) -> Path:
    """The checkpoint folder: --model-path's (a GGUF converted once), or a dummy model's config folder."""
    if args.load_format == "dummy":
        return dummy_config_folder(args.model_path)
    return resolve_checkpoint(args.model_path, Path(args.cache_dir))


@dataclass
class RankModel:
    model: nn.Module
    dtype: torch.dtype
    quantization: str
    quantized_layers: dict[str, int]
    quantized_dense_from_rows: int
    dummy_seed: int | None
    context_len: int
    max_running: int
    pool: KVPool
    graph_reserve: int
    compiled: "CompiledModel | None"
    profile: Profile
    seconds: dict[str, float] = field(default_factory=dict)  # load, pool_sizing, compile, warm_up


def build_rank_model(args: ServerArgs, device: torch.device, tp: TensorParallel, checkpoint: Path, cfg: ModelConfig, zeroed_pool: bool) -> RankModel:
    t0 = time.monotonic()
    compiler_runtime = None if args.disable_compile else _prefetch_compiler_runtime()
    dummy = args.load_format == "dummy"
    free_before = available_memory(device)
    path = None if dummy else gguf_file(args.model_path)
    gguf = None if path is None else GGUFQ4_1(path, checkpoint / "q4_1.blocks")
    quantization, dtype = resolve_quantization(args.torchao_config, args.dtype, device, gguf)
    profile = Profile.for_device(device.type, args.profile).narrowed(args.cuda_graph_max_bs)
    cache = _use_compile_cache(args, tp, cfg, quantization, dtype, device, profile)
    kernels = _build_kernels(quantization, device)
    dummy_seed = args.random_seed if dummy else None
    model = load_model(checkpoint, cfg, dtype, device, args.is_embedding, dummy_seed, tp=tp)
    dense_from_rows = 0 if quantization == "none" else _dense_from_rows(model, profile, free_before)
    quantized = {} if quantization == "none" else quantize_model(model, cfg, quantization, dtype, gguf, tp, dense_from_rows)
    if kernels is not None and cache is None:
        kernels.join()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    t_load = time.monotonic()
    log.info("loaded %s (%.0f MB, %s on %s) in %.1fs", cfg.architectures[0], weights / 1e6, dtype, device, t_load - t0)

    context_len = args.context_length or getattr(model, "max_tokens", cfg.max_position_embeddings)
    kv_heads = tp.local_kv_heads(cfg.num_key_value_heads)
    graph_reserve = 0
    if device.type == "cuda" and not args.disable_compile and not args.disable_cuda_graph:
        # The decode graphs share one memory pool, which the largest bucket sizes; a
        # quarter more covers the compiled pieces' own buffers.
        kv_shape = (cfg.num_hidden_layers, kv_heads, cfg.head_dim)
        graph_reserve = int(1.25 * probe_graph_memory(model, kv_shape, dtype, max(profile.decode_batch_sizes)))
        log.info("reserved %.0f MB for decode CUDA graphs before sizing the KV pool", graph_reserve / 1e6)
    per_token = KVPool.bytes_per_token(cfg.num_hidden_layers, kv_heads, cfg.head_dim, dtype)
    num_slots = args.max_total_tokens
    if num_slots is None:
        # The --dp-size engines share this device's memory, and measured it free at the same time.
        fraction = (args.mem_fraction_static or (0.85 if device.type == "cuda" else 0.3)) / args.dp_size
        num_slots = _smallest(int((free_before * fraction - weights - graph_reserve) // per_token), tp)
    if num_slots < 16:
        raise RuntimeError(f"KV pool would hold only {num_slots} tokens; raise --mem-fraction-static or --max-total-tokens")
    max_running = args.max_running_requests or (256 if device.type == "cuda" else 64)
    pool = KVPool(num_slots, cfg.num_hidden_layers, kv_heads, cfg.head_dim, dtype, device, max_running, context_len, zeroed=zeroed_pool)
    log.info("KV pool: %d tokens, %.2f GB", num_slots, num_slots * per_token / 1e9)
    t_pool = time.monotonic()
    if compiler_runtime is not None:
        compiler_runtime.join()
    compiled = None if cache is None else _compile(args, tp, cache, profile, model, pool, kernels)
    compile_s = compiled.stats.compile_seconds if compiled else 0.0
    seconds = {"load": t_load - t0, "pool_sizing": t_pool - t_load, "compile": compile_s, "warm_up": time.monotonic() - t_pool - compile_s}
    return RankModel(
        model, dtype, quantization, quantized, dense_from_rows, dummy_seed, context_len, max_running, pool, graph_reserve, compiled, profile, seconds
    )


def _prefetch_compiler_runtime() -> threading.Thread:
    """Starts what the compiler needs before its first piece and what does not need the model, so that it
    overlaps reading the weights (mostly file reads and tensor copies, which release the GIL): Inductor's hash
    of torch's sources, which every saved piece is checked against, Kiln's compiler with Dynamo and Inductor,
    and the modules every piece's code imports (about 3 s of a warm start together)."""

    def prefetch() -> None:
        from torch._inductor.codecache import torch_key

        torch_key.prefetch()  # on torch's own worker thread
        for module in ("kiln.compiler.compiled_model", "torch._inductor.select_algorithm"):
            importlib.import_module(module)

    thread = threading.Thread(target=prefetch, name="kiln-compiler-imports", daemon=True)
    thread.start()
    return thread


def _dense_from_rows(model: nn.Module, profile: Profile, free: int) -> int:
    """The profile's row count for float32 copies of quantized weights, or 0 when the copies (at most every
    weight of the model in float32) would take more than a quarter of the memory free at the start."""
    copies = 4 * sum(p.numel() for p in model.parameters())
    if profile.quantized_dense_from_rows and copies > free // 4:
        log.info("no float32 copies of the quantized weights: %.1f GB would not fit in a quarter of %.1f GB free", copies / 1e9, free / 1e9)
        return 0
    return profile.quantized_dense_from_rows


def _smallest(num_slots: int, tp: TensorParallel) -> int:
    """Every rank's pool must hold the same slots (rank 0 hands them out for all): the least any rank has room for."""
    if tp.size == 1:
        return num_slots
    t = torch.tensor([num_slots], dtype=torch.int64)
    dist.all_reduce(t, dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())


def _build_kernels(quantization: str, device: torch.device) -> threading.Thread | None:
    """Starts building (or loading) the int8-activation linears' C++ library where the model will use it, so
    that its build (about 15 s, once) overlaps reading the weights and tracing: a thread, as the compiler's
    toolchain runs in a subprocess. A compiled start joins it before compiling (the build reads Inductor's
    settings, which compiling patches), an eager one once the weights are in."""
    if device.type != "cpu" or quantization not in INT8_ACTIVATION_MODES or not has_kernel():
        return None
    thread = threading.Thread(target=load_kernel, name="kiln-kernels", daemon=True)
    thread.start()
    return thread


def _use_compile_cache(
    args: ServerArgs, tp: TensorParallel, cfg: ModelConfig, quantization: str, dtype: torch.dtype, device: torch.device, profile: Profile
) -> Path | None:
    """The compile cache folder for this model and settings, Inductor's caches pointed at it; None for an
    eager engine, whose Inductor cache is one folder for every model: it holds only the kernel libraries Kiln
    builds (the int8 linears'), which Inductor keys by their source, so a later eager start loads them."""
    root = Path(args.compile_cache_dir or Path(args.cache_dir) / "compile")
    if args.disable_compile:
        use_cache_dir(root / "eager", compiling=False)
        return None
    # A shard's shapes differ with the rank count: one cache per --tp-size, which the ranks share (Inductor's
    # keys tell their pieces apart).
    sharding = {"kiln_tp_size": tp.size} if tp.size > 1 else {}
    key = cache_key({**cfg.raw, "kiln_quantization": quantization, **sharding}, dtype, device, profile)
    cache = root / key
    use_cache_dir(cache)
    return cache


def _compile(
    args: ServerArgs, tp: TensorParallel, cache: Path, profile: Profile, model: nn.Module, pool: KVPool, kernels: threading.Thread | None
) -> "CompiledModel":
    from kiln.compiler.compile_workers import default_workers
    from kiln.compiler.compiled_model import CompiledModel

    # A tensor-parallel trace is not saved: its guards hold the process group, which does not pickle (and its
    # constants differ by rank). Its ranks trace at every start and load their pieces from the cache.
    workers = default_workers() if args.compile_workers is None else args.compile_workers
    compiled = CompiledModel(
        model, profile, cuda_graphs=not args.disable_cuda_graph, trace_dir=cache if tp.size == 1 else None, compile_workers=workers
    )  # fmt: skip
    log.info("compiling %d buckets %s (cache %s)", len(compiled.buckets), compiled.buckets, cache)
    compiled.warm_up((pool.k, pool.v), pool.req_to_token, before_compiling=None if kernels is None else kernels.join)
    return compiled
