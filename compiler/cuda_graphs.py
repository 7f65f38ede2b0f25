"""CUDA graphs: one graph of the whole forward per decode bucket, and one per compiled piece for small prefill buckets.

At batch 1 a decode step of a small model is hundreds of tiny kernels; launching
them one by one costs more than running them. A captured graph replays them
with one launch. The graph reads its inputs from static buffers, so a replay
copies the batch (already padded to the bucket) into them first. Attention in
decode mode reads no host values, which is what makes it capturable whole.

Prefill and mixed batches run attention eagerly (its grid depends on the
batch), so there only the compiled pieces between attention calls are
captured (`PieceGraph`): each piece's graph copies in the inputs that are not
already where the capture saw them, and hands out its static outputs.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kiln.ops.attention import AttentionMetadata

log = logging.getLogger(__name__)

Forward = Callable[[Tensor, Tensor, tuple[Tensor, Tensor], AttentionMetadata], Tensor]


class DecodeGraphs:
    """One captured graph per decode bucket size, sharing one memory pool."""

    def __init__(self, forward: Forward, kv: tuple[Tensor, Tensor], req_to_token: Tensor):
        self.forward = forward
        self.kv = kv
        self.req_to_token = req_to_token
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.inputs: dict[int, tuple[Tensor, Tensor, AttentionMetadata]] = {}
        self.outputs: dict[int, Tensor] = {}
        self.memory_bytes = 0
        self.capture_seconds = 0.0

    def _static_inputs(self, size: int) -> tuple[Tensor, Tensor, AttentionMetadata]:
        # Decode attention takes row b as request b, so extend_starts and max_extend_len
        # (both unread there) stay as padding has them.
        ids, pos = (torch.zeros(size, dtype=torch.int64, device=self.req_to_token.device) for _ in range(2))
        return ids, pos, AttentionMetadata.padding(size, self.req_to_token)

    @torch.inference_mode()
    def capture(self, sizes: list[int]) -> None:
        """Largest first, so smaller graphs reuse the pool's blocks."""
        t0 = time.monotonic()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(sizes, reverse=True):
            ids, pos, meta = self._static_inputs(size)
            # A run outside the graph first: Triton compiles its kernels and
            # Inductor loads its code on first call, which a capture cannot do.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.forward(ids, pos, self.kv, meta)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.forward(ids, pos, self.kv, meta)
            self.graphs[size], self.inputs[size], self.outputs[size] = graph, (ids, pos, meta), out
        torch.cuda.synchronize()
        self.memory_bytes = free_before - torch.cuda.mem_get_info()[0]
        self.capture_seconds = time.monotonic() - t0
        log.info("captured %d decode CUDA graphs in %.1fs; they took %.0f MB", len(sizes), self.capture_seconds, self.memory_bytes / 1e6)

    def run(self, size: int, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        """The batch must already be padded to `size` (padding rows: slot 0, no tokens)."""
        ids, pos, static = self.inputs[size]
        ids.copy_(input_ids)
        pos.copy_(positions)
        static.out_slots.copy_(meta.out_slots)
        static.req_indices.copy_(meta.req_indices)
        static.seq_lens.copy_(meta.seq_lens)
        static.extend_lens.copy_(meta.extend_lens)
        self.graphs[size].replay()
        return self.outputs[size]


def probe_graph_memory(model: Callable[..., Tensor], kv_shape: tuple[int, int, int], dtype: torch.dtype, size: int) -> int:
    """Bytes one decode graph of `size` rows takes: the eager model captured once over a
    throwaway pool of `size` + 1 slots. Run before the KV pool is sized, so the pool leaves room."""
    layers, kv_heads, head_dim = kv_shape
    kv = tuple(torch.zeros(layers, size + 1, kv_heads, head_dim, dtype=dtype, device="cuda") for _ in range(2))
    graphs = DecodeGraphs(model, kv, torch.zeros(size, 1, dtype=torch.int32, device="cuda"))
    graphs.capture([size])
    used = graphs.memory_bytes
    del graphs, kv
    torch.cuda.empty_cache()
    return used


class PieceGraph:
    """One compiled piece at one bucket size, captured into `pool`.

    Inputs whose memory is fixed (weights, buffers, the KV pool: `static_ptrs`)
    are read in place; every other tensor input gets a buffer of its own that
    each replay copies into. The outputs are the graph's own tensors,
    overwritten by the next replay: callers use them before the next step.
    Pieces sharing a pool must replay in the order they were captured, which
    the model's forward guarantees.
    """

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], static_ptrs: set[int], pool: Any):
        self.args = [a.clone() if isinstance(a, Tensor) and a.data_ptr() not in static_ptrs else a for a in args]
        self.copies = [i for i, (a, own) in enumerate(zip(args, self.args)) if own is not a]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*self.args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn(*self.args)

    def __call__(self, *args: Any) -> Any:
        for i in self.copies:
            self.args[i].copy_(args[i])
        self.graph.replay()
        return self.out
