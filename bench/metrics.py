"""Serving metrics from recorded streams: TTFT, TPOT, ITL, end-to-end latency, and their summaries.

A request's stream is recorded as (seconds since it was sent, output tokens so far) per chunk. Time to
first token is the first chunk that carries a token; a later chunk that brings k tokens after a gap g
counts k inter-token latencies of g / k each (servers may flush several tokens at once). Time per
output token is (latency - TTFT) / (output tokens - 1), per request.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (seconds since sent, output tokens so far)
    latency: float = 0.0  # seconds from sending to the end of the stream

    @property
    def output_len(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0

    @property
    def ttft(self) -> float | None:
        return next((t for t, n in self.chunks if n > 0), None)

    @property
    def itl(self) -> list[float]:
        gaps: list[float] = []
        last_t, last_n = None, 0
        for t, n in self.chunks:
            new = n - last_n
            if new <= 0:
                continue
            if last_t is not None:
                gaps += [(t - last_t) / new] * new
            last_t, last_n = t, n
        return gaps

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_len < 2:
            return None
        return (self.latency - ttft) / (self.output_len - 1)


def stats_ms(values: list[float]) -> dict[str, float]:
    """Mean, median and p99 in milliseconds (numpy's linear interpolation between ranks, as SGLang's bench_serving)."""
    if not values:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(values) * 1000
    return {"mean_ms": float(a.mean()), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    return {
        "sent": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "failures": [r.error for r in results if not r.success],
        "duration_s": duration_s,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "input_tok_s": input_tokens / duration_s,
        "output_tok_s": output_tokens / duration_s,
        "ttft": stats_ms([t for r in ok if (t := r.ttft) is not None]),
        "tpot": stats_ms([t for r in ok if (t := r.tpot) is not None]),
        "itl": stats_ms([g for r in ok for g in r.itl]),
        "e2e": stats_ms([r.latency for r in ok]),
    }
