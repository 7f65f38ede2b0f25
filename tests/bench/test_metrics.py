"""Metric arithmetic on recorded streams with known timestamps, against values worked out by hand."""

import math

import pytest

from kiln.bench.metrics import RequestResult, stats_ms, summarize


def test_one_stream_ttft_itl_tpot() -> None:
    # Tokens 1 at 0.5 s, 2 at 0.7 s, 3-4 together at 1.0 s, 5 at 1.1 s; a chunk with no new token at 0.8 s.
    r = RequestResult(prompt_len=10, success=True, chunks=[(0.2, 0), (0.5, 1), (0.7, 2), (0.8, 2), (1.0, 4), (1.1, 5)], latency=1.2)
    assert r.output_len == 5
    assert r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.2, 0.15, 0.15, 0.1])  # 0.7-0.5; (1.0-0.7)/2 twice; 1.1-1.0
    assert r.tpot == pytest.approx((1.2 - 0.5) / 4)


def test_stream_without_tokens_has_no_ttft() -> None:
    r = RequestResult(prompt_len=3, success=True, chunks=[(0.1, 0)], latency=0.2)
    assert (r.output_len, r.ttft, r.tpot, r.itl) == (0, None, None, [])


def test_percentiles_interpolate_linearly() -> None:
    s = stats_ms([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["median_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)  # rank 0.99 * 99 = 98.01: 99 + 0.01 * (100 - 99)
    assert all(math.isnan(v) for v in stats_ms([]).values())


def test_summary_counts_only_successes_and_lists_failures() -> None:
    a = RequestResult(prompt_len=10, success=True, chunks=[(0.1, 1), (0.3, 2), (0.5, 3)], latency=0.5)
    b = RequestResult(prompt_len=20, success=True, chunks=[(0.3, 2), (0.7, 4)], latency=0.8)
    bad = RequestResult(prompt_len=99, error="HTTP 400: too long")
    s = summarize([a, b, bad], duration_s=2.0)
    assert (s["sent"], s["succeeded"], s["failed"], s["failures"]) == (3, 2, 1, ["HTTP 400: too long"])
    assert (s["input_tokens"], s["output_tokens"]) == (30, 7)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["input_tok_s"] == pytest.approx(15.0)
    assert s["output_tok_s"] == pytest.approx(3.5)
    assert s["ttft"]["mean_ms"] == pytest.approx(200.0)  # 100 and 300 ms
    assert s["ttft"]["p99_ms"] == pytest.approx(298.0)
    # a: TPOT (0.5-0.1)/2 = 200 ms; b: (0.8-0.3)/3 = 166.67 ms
    assert s["tpot"]["mean_ms"] == pytest.approx((200 + 500 / 3) / 2)
    # ITL: a gives 200, 200; b gives (0.7-0.3)/2 = 200 twice
    assert s["itl"] == pytest.approx({"mean_ms": 200.0, "median_ms": 200.0, "p99_ms": 200.0})
    assert s["e2e"]["median_ms"] == pytest.approx(650.0)
