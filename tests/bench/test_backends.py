"""The streaming clients on canned server answers (httpx's mock transport): what counts as success, and token counts."""

import asyncio
import json
from pathlib import Path

import httpx

from kiln.bench.backends import native, openai_completions
from kiln.bench.datasets import BenchRequest
from kiln.bench.metrics import RequestResult
from kiln.models.loader import resolve_checkpoint
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer

REQ = BenchRequest("hello there", [1, 2, 3], 3)


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def send(sender, status: int, body: bytes) -> RequestResult:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(status, content=body)

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await sender(client, REQ)

    result = asyncio.run(go())
    assert len(seen) == 1
    return result


def native_chunk(n: int, finish: dict | None = None) -> dict:
    return {"text": "x" * n, "meta_info": {"completion_tokens": n, "finish_reason": finish}}


def test_native_full_stream() -> None:
    r = send(native("http://s"), 200, sse(native_chunk(1), native_chunk(3), native_chunk(3, {"type": "length"})))
    assert r.success and r.error == ""
    assert [n for _, n in r.chunks] == [1, 3, 3]
    assert r.output_len == 3 and r.prompt_len == 3


def test_native_stream_cut_short_is_a_failure() -> None:
    r = send(native("http://s"), 200, sse(native_chunk(1), native_chunk(2)))
    assert not r.success
    assert r.error == "the stream ended without a finish reason, after 2 output tokens"


def test_http_error_and_error_chunk_are_failures() -> None:
    r = send(native("http://s"), 400, b'{"error": {"message": "bad input"}}')
    assert not r.success and r.error == 'HTTP 400: {"error": {"message": "bad input"}}'
    r = send(native("http://s"), 200, sse(native_chunk(1), {"error": {"message": "engine died"}}))
    assert not r.success and r.error == "error in stream: {'message': 'engine died'}"


def test_openai_counts_tokens_of_the_text_so_far() -> None:
    tok = load_tokenizer(str(resolve_checkpoint(None, Path(ServerArgs().cache_dir))))
    words = [" The", " cat", " sat"]
    chunks = [{"choices": [{"index": 0, "text": w, "finish_reason": "length" if i == 2 else None}]} for i, w in enumerate(words)]
    r = send(openai_completions("http://s", "m", tok, {"ignore_eos": True}), 200, sse({"choices": [{"index": 0, "text": ""}]}, *chunks))
    assert r.success
    assert [n for _, n in r.chunks] == [1, 2, 3]  # the empty first chunk carries no token
    assert r.output_len == len(tok("".join(words), add_special_tokens=False).input_ids)


def test_request_bodies() -> None:
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append((request.url.path, json.loads(request.content)))
        return httpx.Response(200, content=sse())

    async def go() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await native("http://s")(client, REQ)
            await openai_completions("http://s", "m", None, {"logit_bias": {"2": -100.0}})(client, REQ)

    asyncio.run(go())
    assert bodies[0] == ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}, "stream": True})
    assert bodies[1] == ("/v1/completions", {"model": "m", "prompt": "hello there", "max_tokens": 3, "temperature": 0, "stream": True, "logit_bias": {"2": -100.0}})
