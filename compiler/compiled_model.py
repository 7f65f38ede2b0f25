"""The compiled forward: pads each batch to a bucket, runs the piecewise-compiled model."""

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from kiln.compiler.piecewise import CompileStats, piecewise_backend
from kiln.compiler.profile import Profile, pick
from kiln.ops.attention import AttentionMetadata

log = logging.getLogger(__name__)


class CompiledModel:
    """Calls like the model's forward; every call after warm-up reuses a compiled bucket."""

    def __init__(self, model: nn.Module, profile: Profile):
        self.model = model
        self.profile = profile
        self.stats = CompileStats()
        self.eager_fallbacks = 0
        self.warm_up_seconds = 0.0
        self.buckets = sorted(set(profile.decode_batch_sizes) | set(profile.prefill_token_counts))
        self._compiled = torch.compile(model.forward, backend=piecewise_backend(self.stats, profile.inductor), fullgraph=True)

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
        with torch.compiler.set_stance("fail_on_recompile" if self.stats.frozen else "default"):
            return self._compiled(*padded[:2], kv, padded[2])[:n]

    @staticmethod
    def _pad(size: int, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """Padding rows write to slot 0; padding requests have no tokens, so attention skips them."""
        rows = lambda t: F.pad(t, (0, size - t.shape[0]))  # noqa: E731
        return rows(input_ids), rows(positions), AttentionMetadata(
            out_slots=rows(meta.out_slots),
            req_to_token=meta.req_to_token,
            req_indices=rows(meta.req_indices),
            seq_lens=rows(meta.seq_lens),
            extend_lens=rows(meta.extend_lens),
        )

    def warm_up(self, kv: tuple[Tensor, Tensor], req_to_token: Tensor, show_progress: bool = True) -> None:
        """Traces once, compiles every bucket (from the persistent cache when it has them), then freezes."""
        t0 = time.monotonic()
        device = kv[0].device
        for size in tqdm(self.buckets, desc="compiling buckets", unit="bucket", disable=not show_progress):
            # Inference-mode tensors like the runner's (Dynamo guards on dispatch keys),
            # and distinct ones (it guards on aliasing between inputs too).
            with torch.inference_mode():
                ids, pos, slots, reqs, lens, ext = (torch.zeros(size, dtype=torch.int64, device=device) for _ in range(6))
                if self.stats.traces == 0:
                    for t in (ids, pos, slots, reqs, lens, ext):
                        torch._dynamo.mark_dynamic(t, 0)
                self._compiled(ids, pos, kv, AttentionMetadata(slots, req_to_token, reqs, lens, ext))
        self.stats.frozen = True
        self.warm_up_seconds = time.monotonic() - t0
        log.info("compiled %d buckets in %.1fs: %s", len(self.buckets), self.warm_up_seconds, self.counters())

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
            "cache_hits": int(inductor["fxgraph_cache_hit"]),
            "cache_misses": int(inductor["fxgraph_cache_miss"]),
            "recompiles": max(self.stats.traces - 1, 0),
            "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())),
            "eager_fallbacks": self.eager_fallbacks,
        }
