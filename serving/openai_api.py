"""OpenAI-compatible /v1/completions and /v1/chat/completions on top of the tokenizer manager."""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from kiln.serving.protocol import ChatCompletionRequest, CompletionRequest
from kiln.serving.tokenizer_manager import BadRequest, SingleRequest, TokenizerManager


def _params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    if req.logprobs:
        raise BadRequest("logprobs is not supported by this server yet.")
    return {
        "max_new_tokens": max_tokens,
        "min_new_tokens": req.min_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "stop": req.stop,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty,
        "ignore_eos": req.ignore_eos,
        "sampling_seed": req.seed,
    }


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta["finish_reason"]
    if reason is None:
        return None, None
    kind = {"length": "length", "stop": "stop"}.get(reason["type"], "abort")
    return kind, reason.get("matched")


class OpenAIServing:
    def __init__(self, tm: TokenizerManager, model_name: str):
        self.tm = tm
        self.model_name = model_name

    def _prompts(self, prompt: str | list[Any]) -> list[list[int]]:
        items = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if not items or items == [[]]:
            raise BadRequest("prompt must not be empty.")
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(self.tm.tokenizer(item).input_ids)
            elif isinstance(item, list) and all(type(t) is int for t in item):
                out.append(item)
            else:
                raise BadRequest("prompt must be a string, a list of strings, a list of token ids, or a list of such lists.")
        return out

    def _requests(self, prompts: list[list[int]], raw: dict[str, Any], n: int) -> list[SingleRequest]:
        reqs = []
        for ids in prompts:
            if raw["max_new_tokens"] is None:
                raw = {**raw, "max_new_tokens": max(self.tm.context_len - len(ids) - 1, 1)}
            params = self.tm.sampling_params(raw)
            self.tm.check_length(ids, params)
            for _ in range(n):
                reqs.append(SingleRequest(uuid.uuid4().hex, ids, params))
        return reqs

    def completion_requests(self, req: CompletionRequest) -> list[SingleRequest]:
        return self._requests(self._prompts(req.prompt), _params(req, req.max_tokens), req.n)

    def chat_requests(self, req: ChatCompletionRequest) -> list[SingleRequest]:
        messages = [msgspec.structs.asdict(m) for m in req.messages]
        if not messages:
            raise BadRequest("messages must not be empty.")
        try:
            text = self.tm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            raise BadRequest(f"could not apply the chat template: {exc}") from exc
        ids = self.tm.tokenizer(text, add_special_tokens=False).input_ids
        return self._requests([ids], _params(req, req.max_completion_tokens or req.max_tokens), req.n)

    def _usage(self, results: list[dict[str, Any]], n: int) -> dict[str, int]:
        prompt = sum(r["meta_info"]["prompt_tokens"] for r in results[::n])
        completion = sum(r["meta_info"]["completion_tokens"] for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def completion(self, req: CompletionRequest, reqs: list[SingleRequest]) -> dict[str, Any]:
        results = await self.tm.run_all(reqs)
        choices = []
        for i, (r, single) in enumerate(zip(results, reqs)):
            reason, matched = _finish(r["meta_info"])
            text = r["text"]
            if req.echo:
                text = self.tm.tokenizer.decode(single.input_ids) + text
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason, "matched_stop": matched})
        return self._envelope("cmpl", "text_completion", choices, self._usage(results, req.n))

    async def chat(self, req: ChatCompletionRequest, reqs: list[SingleRequest]) -> dict[str, Any]:
        results = await self.tm.run_all(reqs)
        choices = []
        for i, r in enumerate(results):
            reason, matched = _finish(r["meta_info"])
            message = {"role": "assistant", "content": r["text"], "tool_calls": None, "reasoning_content": None}
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason, "matched_stop": matched})
        return self._envelope("chatcmpl", "chat.completion", choices, self._usage(results, req.n))

    async def stream(self, reqs: list[SingleRequest], chat: bool) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks with text deltas; a chat stream opens each choice with the assistant role."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        sent = [0] * len(reqs)
        if chat:
            for i in range(len(reqs)):
                yield self._chunk(rid, kind, {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for out in self.tm.stream_all(reqs, is_batch=True):
            i = out["index"]
            delta, sent[i] = out["text"][sent[i] :], len(out["text"])
            reason, matched = _finish(out["meta_info"])
            if not delta and reason is None:
                continue
            body = {"delta": {"content": delta}} if chat else {"text": delta, "logprobs": None}
            yield self._chunk(rid, kind, {"index": i, **body, "finish_reason": reason, "matched_stop": matched})

    def _envelope(self, prefix: str, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": usage,
        }

    def _chunk(self, rid: str, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name, "choices": [choice]}

