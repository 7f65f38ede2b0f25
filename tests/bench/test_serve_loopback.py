"""A short real run of the load generator against `kiln serve` on loopback: every request is accounted for."""

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.bench.backends import native, openai_completions
from kiln.bench.common import free_port
from kiln.bench.datasets import BenchRequest, random_requests
from kiln.bench.metrics import summarize
from kiln.bench.peers import launched, make_peer
from kiln.bench.serve import run_load
from kiln.models.loader import default_model_path, resolve_checkpoint
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer

OUTPUT_LEN = 8


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(resolve_checkpoint(None, Path(ServerArgs().cache_dir))))


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    checkpoint = resolve_checkpoint(None, Path(ServerArgs().cache_dir))
    peer = make_peer("kiln[--disable-compile --max-total-tokens 4096 --max-running-requests 8]", port, "float32", checkpoint, default_model_path(), tokenizer.eos_token_id)
    with launched(peer, port, tmp_path_factory.mktemp("bench") / "kiln.log", timeout_s=300) as base:
        yield base


@pytest.mark.slow
def test_native_run_accounts_for_every_request(server: str, tokenizer) -> None:
    reqs = random_requests(tokenizer, 6, input_len=24, output_len=OUTPUT_LEN, range_ratio=0.5, source="ids", seed=0)
    bad = BenchRequest("", [len(tokenizer) + 5], OUTPUT_LEN)  # outside the vocabulary: the server answers 400
    results, duration = asyncio.run(run_load(native(server), [*reqs[:3], bad, *reqs[3:]], math.inf, 3, seed=0))
    s = summarize(results, duration)
    assert (s["sent"], s["succeeded"], s["failed"]) == (7, 6, 1)
    assert len(s["failures"]) == 1 and s["failures"][0].startswith("HTTP 400") and "outside the vocabulary" in s["failures"][0]
    ok = [r for r in results if r.success]
    assert [r.prompt_len for r in ok] == [len(r.prompt_ids) for r in reqs]  # results keep the order sent
    for r, req in zip(ok, reqs):
        assert r.output_len == req.output_len  # 4 to 8 tokens: the range ratio applies to outputs too
        assert 0 < r.ttft <= r.latency
        assert len(r.itl) == req.output_len - 1 and all(g >= 0 for g in r.itl)
        assert [n for _, n in r.chunks] == sorted(n for _, n in r.chunks)  # counts never go back
    assert s["output_tokens"] == sum(r.output_len for r in reqs)
    assert s["input_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    assert s["output_tok_s"] == pytest.approx(s["output_tokens"] / duration)


@pytest.mark.slow
def test_openai_run_counts_tokens_from_text(server: str, tokenizer) -> None:
    reqs = random_requests(tokenizer, 3, input_len=16, output_len=OUTPUT_LEN, source="text", seed=1)
    results, duration = asyncio.run(run_load(openai_completions(server, "default", tokenizer, {"ignore_eos": True}), reqs, 50.0, None, seed=0))
    s = summarize(results, duration)
    assert (s["sent"], s["succeeded"], s["failed"], s["failures"]) == (3, 3, 0, [])
    for r in results:
        # Greedy text re-tokenizes to about the tokens made; a token or two may merge across a chunk border.
        assert OUTPUT_LEN - 2 <= r.output_len <= OUTPUT_LEN
        assert r.ttft is not None and r.ttft <= r.latency
