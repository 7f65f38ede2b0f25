"""Prometheus metrics (`--enable-metrics`) under SGLang's names, labels and buckets, so its dashboards work.

Per-request figures are counted here, in the HTTP process, as outputs arrive: the engine's loop does
no counting. The engines' own gauges (running, queued, KV use, throughput) and Kiln's compile counters
are read from each engine when /metrics is scraped.
"""

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kiln.serving.messages import EngineStats, FinishAbort, TokenOutput

TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
ITL_BUCKETS = [0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8]
E2E_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400]
QUEUE_BUCKETS = [
    0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100,
    200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000,
]  # fmt: skip
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, help, EngineStats field) of the scheduler's gauges.
ENGINE_GAUGES = [
    ("sglang:num_running_reqs", "The number of running requests.", "num_running_reqs"),
    ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", "num_waiting_reqs"),
    ("sglang:num_used_tokens", "The number of used tokens.", "num_used_tokens"),
    ("sglang:token_usage", "The token usage.", "token_usage"),
    ("sglang:cache_hit_rate", "The prefix cache hit rate.", "cache_hit_rate"),
    ("sglang:gen_throughput", "The generation throughput (token/s).", "gen_throughput"),
    ("sglang:num_retracted_reqs", "The number of retracted requests.", "num_retracted_reqs"),
]
# (name, help, key of EngineStats.compile) of Kiln's compile figures.
COMPILE_GAUGES = [
    ("kiln:recompiles", "Dynamo traces after the first one (0 while serving).", "recompiles"),
    ("kiln:eager_fallbacks", "Forwards that fitted no compiled bucket and ran eagerly.", "eager_fallbacks"),
    ("kiln:graph_breaks", "Graph breaks in the compiled forward.", "graph_breaks"),
    ("kiln:buckets_compiled", "Shape buckets compiled.", "buckets_compiled"),
    ("kiln:compile_cache_hits", "Inductor FX-graph cache hits at start-up.", "cache_hits"),
    ("kiln:compile_cache_misses", "Inductor FX-graph cache misses at start-up.", "cache_misses"),
    ("kiln:cuda_graphs", "Decode CUDA graphs captured.", "cuda_graphs"),
]


class EngineCollector:
    """Yields the engines' gauges from the last stats read (taken just before each scrape): one sample per
    engine, labelled with its `dp_rank` when there are several (rates and usages do not add up)."""

    def __init__(self, labels: dict[str, str], dp_size: int):
        self.labels = labels
        self.dp_size = dp_size
        self.stats: list[EngineStats] | None = None

    def _family(self, kind: type[Metric], name: str, doc: str, values: list[float]) -> Metric:
        ranked = self.dp_size > 1
        family = kind(name, doc, labels=[*self.labels, *(["dp_rank"] if ranked else [])])
        for rank, value in enumerate(values):
            family.add_metric([*self.labels.values(), *([str(rank)] if ranked else [])], value)
        return family

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            return
        for name, doc, field in ENGINE_GAUGES:
            yield self._family(GaugeMetricFamily, name, doc, [getattr(s, field) for s in self.stats])
        yield self._family(
            CounterMetricFamily, "sglang:num_retracted_requests", "Total number of retracted requests.", [s.total_retractions for s in self.stats]
        )
        for name, doc, key in COMPILE_GAUGES:
            if key in self.stats[0].compile:
                yield self._family(GaugeMetricFamily, name, doc, [s.compile[key] for s in self.stats])


class RequestTimer:
    """One request's clock: time to first token, inter-token latency, end to end."""

    def __init__(self, metrics: "ServingMetrics", streaming: bool):
        self.m = metrics
        self.streaming = streaming
        self.start = self.last = time.perf_counter()
        self.first = True
        self.tokens = 0

    def output(self, out: TokenOutput) -> None:
        m, s = self.m, self.streaming
        now = time.perf_counter()
        if out.queue_time is not None:
            m.queue_time.observe(out.queue_time)
        n = len(out.new_ids)
        self.tokens += n
        if n and self.first:
            m.ttft[s].observe(now - self.start)
            self.first = False
        elif n:
            for _ in range(n):  # as SGLang: the interval is shared by the tokens it brought
                m.itl.observe((now - self.last) / n)
        if n:
            self.last = now
        if out.finish_reason is not None:
            m.prompt_tokens[s].inc(out.prompt_tokens)
            m.generation_tokens[s].inc(self.tokens)
            m.cached_tokens.inc(out.cached_tokens)
            m.requests[s].inc()
            m.e2e[s].observe(now - self.start)
            if isinstance(out.finish_reason, FinishAbort):
                m.aborted.inc()


class ServingMetrics:
    def __init__(self, model_name: str, dp_size: int = 1):
        self.registry = CollectorRegistry(auto_describe=True)
        base = {"model_name": model_name, "engine_type": "unified"}
        self.engine = EngineCollector(base | {"tp_rank": "0", "pp_rank": "0", "moe_ep_rank": "0"}, dp_size)
        self.registry.register(self.engine)
        r = self.registry

        def per_stream(metric: Any) -> dict[bool, Any]:
            return {s: metric.labels(**base, is_streaming=str(s).lower()) for s in (False, True)}

        def metric(kind: Any, name: str, doc: str, streaming: bool = False, **kw: Any) -> Any:
            m = kind(name, doc, [*base, "is_streaming"] if streaming else list(base), registry=r, **kw)
            return per_stream(m) if streaming else m.labels(**base)

        self.prompt_tokens = metric(Counter, "sglang:prompt_tokens", "Number of prefill tokens processed.", True)
        self.generation_tokens = metric(Counter, "sglang:generation_tokens", "Number of generation tokens processed.", True)
        cached = Counter("sglang:cached_tokens", "Number of cached prompt tokens by source (device/host/storage).", [*base, "cache_source"], registry=r)
        self.cached_tokens = cached.labels(**base, cache_source="device")
        self.requests = metric(Counter, "sglang:num_requests", "Number of requests processed.", True)
        self.aborted = metric(Counter, "sglang:num_aborted_requests", "Number of requests aborted.")
        self.ttft = metric(Histogram, "sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.", True, buckets=TTFT_BUCKETS)
        self.itl = metric(Histogram, "sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", buckets=ITL_BUCKETS)
        self.e2e = metric(Histogram, "sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds", True, buckets=E2E_BUCKETS)
        queue = Histogram("sglang:queue_time_seconds", "Histogram of queueing time in seconds.", list(self.engine.labels), registry=r, buckets=QUEUE_BUCKETS)
        self.queue_time = queue.labels(**self.engine.labels)

    def timer(self, streaming: bool) -> RequestTimer:
        return RequestTimer(self, streaming)

    def exposition(self, stats: list[EngineStats] | None) -> bytes:
        """The text format, with the engines' gauges from `stats`, by dp rank (None: left out, an engine did not answer)."""
        self.engine.stats = stats
        return generate_latest(self.registry)
