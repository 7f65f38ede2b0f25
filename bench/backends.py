"""Streaming clients for the two request formats of SGLang's bench_serving: native /generate and OpenAI /v1/completions.

Each sends one BenchRequest greedily with EOS ignored (so every request makes its full output length)
and records when each chunk arrived and how many output tokens had come by then.
"""

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from transformers import PreTrainedTokenizerBase

from kiln.bench.datasets import BenchRequest
from kiln.bench.metrics import RequestResult

Send = Callable[[httpx.AsyncClient, BenchRequest], Awaitable[RequestResult]]


async def _events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: RequestResult,
    count: Callable[[dict[str, Any]], int | None], finished: Callable[[dict[str, Any]], bool],
) -> RequestResult:  # fmt: skip
    """POSTs `body` and fills `result`; `count` gives the output tokens so far from a chunk (None: no tokens in it).

    A stream that ends without a chunk that `finished` recognises is a failure: a server that cuts
    requests short (llama-cpp-python interrupts a stream when another request arrives) must not
    pass for one that served them.
    """
    start = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}"
                return result
            async for event in _events(resp):
                if "error" in event:
                    result.error = f"error in stream: {event['error']}"
                    return result
                n = count(event)
                if n is not None:
                    result.chunks.append((time.perf_counter() - start, n))
                done = done or finished(event)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.latency = time.perf_counter() - start
    if not done:
        result.error = f"the stream ended without a finish reason, after {result.output_len} output tokens"
        return result
    result.success = True
    return result


def _native_tokens(event: dict[str, Any]) -> int:
    return event["meta_info"]["completion_tokens"]


def _native_finished(event: dict[str, Any]) -> bool:
    return event["meta_info"]["finish_reason"] is not None


def _openai_finished(event: dict[str, Any]) -> bool:
    return any(c.get("finish_reason") for c in event.get("choices", []))


def native(base_url: str, extra_body: dict[str, Any] | None = None) -> Send:
    """SGLang's /generate with input_ids; meta_info.completion_tokens counts the tokens so far."""

    async def send(client: httpx.AsyncClient, req: BenchRequest) -> RequestResult:
        params = {"temperature": 0, "max_new_tokens": req.output_len, "ignore_eos": True}
        body = {"input_ids": req.prompt_ids, "sampling_params": params, "stream": True, **(extra_body or {})}
        result = RequestResult(prompt_len=len(req.prompt_ids))
        return await _stream(client, f"{base_url}/generate", body, result, _native_tokens, _native_finished)

    return send


def openai_completions(base_url: str, model: str, tokenizer: PreTrainedTokenizerBase, extra_body: dict[str, Any] | None = None) -> Send:
    """/v1/completions with the prompt as text; OpenAI chunks carry text only, so the tokens so far are
    the model tokenizer's count of the text so far (as bench_serving counts them)."""

    async def send(client: httpx.AsyncClient, req: BenchRequest) -> RequestResult:
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0, "stream": True, **(extra_body or {})}
        result = RequestResult(prompt_len=len(req.prompt_ids))
        text = ""

        def count(event: dict[str, Any]) -> int | None:
            nonlocal text
            delta = "".join(c.get("text") or "" for c in event.get("choices", []))
            if not delta:
                return None
            text += delta
            return len(text)  # characters for now; turned into tokens once the stream is over

        await _stream(client, f"{base_url}/v1/completions", body, result, count, _openai_finished)
        # Counting tokens per chunk during the stream would slow the client down under load; count them afterwards.
        result.chunks = [(t, len(tokenizer(text[:n], add_special_tokens=False).input_ids)) for t, n in result.chunks]
        return result

    return send
