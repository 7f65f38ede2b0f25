"""The compiled forward: pads each batch to a bucket, runs the piecewise-compiled model."""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kiln.compiler.compile_workers import Unit, Workers, WorkSpec, do_units
from kiln.compiler.cuda_graphs import DecodeGraphs
from kiln.compiler.piecewise import CompileStats, PiecewiseGraph, piecewise_backend
from kiln.compiler.profile import Profile, pick
from kiln.compiler.unguarded_trace import load_unguarded
from kiln.ops.attention import AttentionMetadata
from kiln.ops.attention_decode_cpu import prepare_decode

log = logging.getLogger(__name__)


class PaddedBatch:
    """One bucket's inputs: ids, positions and the metadata's rows in one [7, size] buffer, zero past the batch."""

    def __init__(self, size: int, req_to_token: Tensor):
        self.rows = torch.zeros(7, size, dtype=torch.int64, device=req_to_token.device)
        ids, positions, out_slots, req_indices, seq_lens, extend_lens, extend_starts = self.rows
        self.inputs = ids, positions
        self.meta = AttentionMetadata(out_slots, req_to_token, req_indices, seq_lens, extend_lens, extend_starts, torch.zeros(1, dtype=torch.int64))
        self.filled = (0, 0)  # the token and request counts of the last batch, whose rows are not zero

    def fill(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> tuple[Tensor, Tensor, AttentionMetadata]:
        n, b, size = input_ids.shape[0], meta.req_indices.shape[0], self.rows.shape[1]
        parts = (input_ids, positions, meta.out_slots, meta.req_indices, meta.seq_lens, meta.extend_lens, meta.extend_starts)
        if n == b == size:
            torch.stack(parts, out=self.rows)  # a full bucket of decode rows: one op, nothing to pad
        else:
            if self.filled != (n, b):
                self.rows.zero_()
            if n == b:
                self.rows[:, :n].copy_(torch.stack(parts))
            else:
                for row, t in zip(self.rows, parts):
                    row[: t.shape[0]].copy_(t)
        self.filled = (n, b)
        self.meta.max_extend_len = meta.max_extend_len  # a host tensor, read by the kernels, not by compiled code
        return *self.inputs, self.meta


# Dynamo's trace of the model, kept beside Inductor's pieces in the compile cache folder.
TRACE_FILE = "dynamo-trace.bin"


class CompiledModel:
    """Calls like the model's forward; every call after warm-up reuses a compiled bucket.

    The model is traced once per compile cache folder: torch.compile's aot_compile saves the trace (Dynamo's
    bytecode and graph, cut into pieces) to `trace_dir`, and a later start loads it instead of tracing again.
    The saved trace skips Dynamo's guards: the cache folder's key (compiler/cache.py) already covers what they
    would check (model config, dtype, device, profile, Kiln's and torch's versions).

    A cold start on the CPU shares its compiling with `compile_workers` processes (compiler/compile_workers.py)."""

    def __init__(
        self, model: nn.Module, profile: Profile, cuda_graphs: bool = True, trace_dir: Path | None = None, compile_workers: int = 0
    ):  # fmt: skip
        self.model = model
        self.compile_workers = compile_workers
        self.workers_started = 0
        self.buckets_by_workers = 0
        self.trace_file = None if trace_dir is None else trace_dir / TRACE_FILE
        self.use_cuda_graphs = cuda_graphs
        self.graphs: DecodeGraphs | None = None
        self.piece_graph_bytes = 0
        self.profile = profile
        self.stats = CompileStats(artifact_dir=trace_dir)
        self.eager_fallbacks = 0
        self.warm_up_seconds = 0.0
        self.trace_loaded = False
        self.decode_kernels_loaded = 0
        self.buckets = sorted(set(profile.decode_batch_sizes) | set(profile.prefill_token_counts))
        self._forward: Any = None  # the traced forward, called with the model first; set by warm_up
        self._padded: dict[int, PaddedBatch] = {}

    def bucket_for(self, num_tokens: int, num_reqs: int) -> int | None:
        if num_tokens == num_reqs:
            size = pick(self.profile.decode_batch_sizes, num_reqs)
            if size is not None:
                return size
        return pick(self.profile.prefill_token_counts, num_tokens)

    def __call__(self, input_ids: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        n = input_ids.shape[0]
        size = self.bucket_for(n, meta.req_indices.shape[0])
        if size is None:
            self.eager_fallbacks += 1
            return self.model(input_ids, positions, kv, meta)
        padded = self._pad(size, input_ids, positions, meta)
        if self.graphs is not None and size in self.graphs.graphs and n == meta.req_indices.shape[0]:
            return self.graphs.run(size, *padded)[:n]
        return self._run(padded[0], padded[1], kv, padded[2])[:n]

    def _run(self, input_ids: Tensor, positions: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        # The traced forward never re-enters Dynamo; the CPU decode kernels it calls are compiled functions
        # of their own, which must not recompile while serving either.
        with torch.compiler.set_stance("fail_on_recompile" if self.stats.frozen else "default"):
            return self._forward(self.model, input_ids, positions, kv, meta)

    def _pad(self, size: int, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """The batch copied into its bucket's own buffers, which every step of that size reuses. Padding rows
        write to slot 0; padding requests have no tokens, so attention skips them."""
        padded = self._padded.get(size)
        if padded is None:
            padded = self._padded[size] = PaddedBatch(size, meta.req_to_token)
        return padded.fill(input_ids, positions, meta)

    def warm_up(
        self, kv: tuple[Tensor, Tensor], req_to_token: Tensor, show_progress: bool = True, before_compiling: Callable[[], None] | None = None
    ) -> None:
        """Traces the model (or loads the saved trace), then compiles every bucket's distinct pieces and the C++
        kernels they call (loads them, when the persistent cache has them) without running the model, then freezes.
        `before_compiling` runs once the compile workers have started, before this process compiles anything."""
        t0 = time.monotonic()
        with torch.inference_mode():
            if self.trace_file is not None and self.trace_file.exists():
                self.load_trace()
            else:
                self._trace(kv, req_to_token)
            self._compile_units(kv[0].shape[2], kv[0].dtype, kv[0].is_cuda, show_progress, before_compiling)
        self.stats.frozen = True
        if kv[0].is_cuda and self.use_cuda_graphs:
            self.graphs = DecodeGraphs(self._run, kv, req_to_token)
            self.graphs.capture(list(self.profile.decode_batch_sizes))
            self._capture_pieces(kv, req_to_token)
        self.warm_up_seconds = time.monotonic() - t0
        log.info("compiled %d buckets in %.1fs: %s", len(self.buckets), self.warm_up_seconds, self.counters())

    def _compile_units(
        self, kv_heads: int, kv_dtype: torch.dtype, cuda: bool, show_progress: bool, before_compiling: Callable[[], None] | None
    ) -> None:
        """Every unit of work, shared with compile workers when this is a cold CPU start: the decode kernels first
        (the longest single builds), then the buckets from the smallest (C++-wrapper pieces, the costliest)."""
        # The decode kernel takes scale, window and cap at run time: one build per head shape.
        units: list[Unit] = [("decode", heads, dim) for heads, dim in sorted({(kind[0], kind[1]) for kind in self.stats.decode_kinds})]
        units += [("bucket", size) for size in self.buckets]
        cold = sum(1 for unit in units if unit[0] == "bucket" and not self._saved(int(unit[1])))
        workers = None
        if self.compile_workers and cold > 1 and not cuda and self.trace_file is not None:
            workers = Workers(WorkSpec(self.trace_file.parent, self.profile, units, kv_heads, kv_dtype), self.compile_workers)
            self.workers_started = len(workers.procs)
        if before_compiling is not None:
            t0 = time.monotonic()
            before_compiling()
            self.stats.compile_seconds += time.monotonic() - t0
        done: set[Unit] = set()
        with tqdm(total=len(units), desc="compiling", unit="unit", disable=not show_progress) as bar:

            def run(unit: Unit) -> None:
                self.do_unit(unit, kv_heads, kv_dtype)
                done.add(unit)
                bar.update()

            do_units(units, run, None if workers is None else workers.claims)
            if workers is not None:
                t0 = time.monotonic()
                log.info("waiting for the compile workers' last units")
                workers.wait()
                self.stats.compile_seconds += time.monotonic() - t0
                theirs = [unit for unit in units if unit not in done]
                self.buckets_by_workers = sum(1 for unit in theirs if unit[0] == "bucket")
                for unit in theirs:  # what the workers saved, loaded
                    run(unit)

    def do_unit(self, unit: Unit, kv_heads: int, kv_dtype: torch.dtype) -> None:
        """Compiles (or loads) one unit of warm-up work."""
        t0 = time.monotonic()
        if unit[0] == "bucket":
            for piece in self.stats.distinct:
                piece.precompile(int(unit[1]))
            return  # pieces count their own time
        heads, dim = int(unit[1]), int(unit[2])
        q, pool = torch.zeros(heads, dim, dtype=kv_dtype), torch.zeros(1, kv_heads, dim, dtype=kv_dtype)
        self.decode_kernels_loaded += prepare_decode(q, pool)
        self.stats.compile_seconds += time.monotonic() - t0

    def _saved(self, size: int) -> bool:
        return all(piece.is_saved(size) for piece in self.stats.distinct)

    def _trace(self, kv: tuple[Tensor, Tensor], req_to_token: Tensor) -> None:
        size = self.buckets[0]
        ids, pos = (torch.zeros(size, dtype=torch.int64, device=kv[0].device) for _ in range(2))
        meta = AttentionMetadata.padding(size, req_to_token)
        # Unbacked, not just dynamic: Dynamo specialises a backed size of 1, so a bucket of 1 would need a second trace.
        for t in (ids, pos, meta.out_slots, meta.req_indices, meta.seq_lens, meta.extend_lens, meta.extend_starts):
            torch._dynamo.decorators.mark_unbacked(t, 0)
        compiled = torch.compile(self.model.forward, backend=piecewise_backend(self.stats, self.profile.inductor_for), fullgraph=True)
        self._forward = compiled.aot_compile(((ids, pos, kv, meta), {}))
        self._forward.disable_guard_check()
        if self.trace_file is not None:
            self._forward.save_compiled_function(str(self.trace_file))

    def load_trace(self) -> None:
        self._forward = load_unguarded(self.trace_file)
        # aot_compile keeps the backend's output as the function's compiled graph; it comes back unbound.
        graph: PiecewiseGraph = self._forward._artifacts.compiled_fn
        graph.bind(self.stats, self.profile.inductor_for)
        self.trace_loaded = True

    @torch.inference_mode()
    def _capture_pieces(self, kv: tuple[Tensor, Tensor], req_to_token: Tensor) -> None:
        """One forward per small prefill bucket with capture on: each piece captures itself, in
        forward order, into that bucket's own memory pool."""
        sizes = [s for s in self.profile.prefill_token_counts if s <= self.profile.piece_graph_max_tokens]
        if not sizes:
            return
        t0, free = time.monotonic(), torch.cuda.mem_get_info()[0]
        fixed = (*self.model.parameters(), *self.model.buffers(), *kv, req_to_token)
        self.stats.static_ptrs = {t.data_ptr() for t in fixed}
        self.stats.graph_sizes = frozenset(sizes)
        for size in sorted(sizes, reverse=True):
            self.stats.capture_pool = torch.cuda.graph_pool_handle()
            ids, pos = (torch.zeros(size, dtype=torch.int64, device=kv[0].device) for _ in range(2))
            self._run(ids, pos, kv, AttentionMetadata.padding(size, req_to_token))
        self.stats.capture_pool = None
        torch.cuda.synchronize()
        self.piece_graph_bytes = free - torch.cuda.mem_get_info()[0]
        log.info(
            "captured %d piece CUDA graphs for prefill buckets %s in %.1fs; they took %.0f MB",
            self.stats.piece_graphs, sizes, time.monotonic() - t0, self.piece_graph_bytes / 1e6,
        )  # fmt: skip

    def counters(self) -> dict[str, Any]:
        inductor = torch._dynamo.utils.counters["inductor"]
        return {
            "buckets": self.buckets,
            "buckets_compiled": len(self.buckets) if self.stats.frozen else 0,
            "warm_up_seconds": round(self.warm_up_seconds, 2),
            "compile_seconds": round(self.stats.compile_seconds, 2),
            "pieces": self.stats.pieces,
            "distinct_pieces": self.stats.unique_pieces,
            "piece_compiles": self.stats.piece_compiles,
            "pieces_loaded": self.stats.pieces_loaded,
            "cache_hits": int(inductor["fxgraph_cache_hit"]),
            "cache_misses": int(inductor["fxgraph_cache_miss"]),
            "recompiles": max(self.stats.traces - 1, 0),
            "trace_loaded": self.trace_loaded,
            "cpu_decode_kernels_loaded": self.decode_kernels_loaded,
            "compile_workers": self.workers_started,
            "buckets_by_workers": self.buckets_by_workers,
            "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())),
            "eager_fallbacks": self.eager_fallbacks,
            "cpu_decode_kernels": len(self.stats.decode_kinds),
            "cuda_graphs": len(self.graphs.graphs) if self.graphs else 0,
            "cuda_graph_memory_mb": round(self.graphs.memory_bytes / 1e6, 1) if self.graphs else 0,
            "piece_cuda_graphs": self.stats.piece_graphs,
            "piece_graph_memory_mb": round(self.piece_graph_bytes / 1e6, 1),
        }
