"""OpenAI-compatible /v1/completions and /v1/chat/completions on top of the tokenizer manager."""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from kiln.serving.api.openai_logprobs import chat_logprobs, completion_logprobs
from kiln.serving.api.schemas import ChatCompletionRequest, CompletionRequest
from kiln.serving.api.tokenizer_manager import SingleRequest, TokenizerManager
from kiln.serving.messages import LogprobRequest
from kiln.serving.sampling_params import InvalidRequest, SamplingParams

MAX_TOP_LOGPROBS = 20


def _logprob_request(req: CompletionRequest | ChatCompletionRequest) -> LogprobRequest | None:
    """Completions: logprobs=N (with echo, the prompt's too). Chat: logprobs=true and top_logprobs=N."""
    name, top = ("logprobs", req.logprobs) if isinstance(req, CompletionRequest) else ("top_logprobs", req.top_logprobs)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {top}.")
    if isinstance(req, CompletionRequest):
        return None if top is None else LogprobRequest(top_n=top, start_len=0 if req.echo else -1)
    if not req.logprobs:
        if top:
            raise InvalidRequest("top_logprobs needs logprobs set to true.")
        return None
    return LogprobRequest(top_n=top or 0)


def _json_schema(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    """response_format as SGLang maps it: json_object is any JSON object, json_schema its schema."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return req.json_schema
    if req.json_schema is not None:
        raise InvalidRequest("Only one of response_format and json_schema can be set.")
    if rf.type == "json_object":
        return '{"type": "object"}'
    if rf.type == "json_schema":
        if rf.json_schema is None or not rf.json_schema.schema:
            raise InvalidRequest("response_format of type json_schema needs json_schema.schema.")
        return bytes(rf.json_schema.schema).decode()
    raise InvalidRequest(f"response_format type must be text, json_object or json_schema, got {rf.type!r}.")


def _params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
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
        "logit_bias": req.logit_bias,
        "regex": req.regex,
        "ebnf": req.ebnf,
        "json_schema": _json_schema(req),
        "stop_token_ids": req.stop_token_ids,
        "skip_special_tokens": req.skip_special_tokens,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "no_stop_trim": req.no_stop_trim,
    }


def _finish(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta["finish_reason"]
    if reason is None:
        return None, None
    kind = {"length": "length", "stop": "stop"}.get(reason["type"], "abort")
    return kind, reason.get("matched")


class OpenAIServing:
    def __init__(self, tm: TokenizerManager):
        self.tm = tm

    async def _prompts(self, prompt: str | list[Any]) -> list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of such lists (not mixed)."""
        v = self.tm.validator
        if isinstance(prompt, str) or (prompt and all(isinstance(p, str) for p in prompt)):
            _, texts = v.texts(prompt, "prompt")
            return await self.tm.encode(texts)
        if not prompt or not all(isinstance(p, int) for p in prompt) and not all(isinstance(p, list) for p in prompt):
            raise InvalidRequest("prompt must be a non-empty string, list of strings, list of token ids, or list of such lists.")
        return v.token_ids(prompt, "prompt")[1]

    def _requests(self, prompts: list[list[int]], raw: dict[str, Any], n: int, logprob: LogprobRequest | None) -> list[SingleRequest]:
        self.tm.validator.n(n)
        reqs = []
        for ids in prompts:
            fields = raw if raw["max_new_tokens"] is not None else {**raw, "max_new_tokens": max(self.tm.context_len - len(ids) - 1, 1)}
            params = SamplingParams(**fields)
            for _ in range(n):
                reqs.append(self.tm.single(uuid.uuid4().hex, ids, params, logprob, logprob_text=True))
        return reqs

    async def completion_requests(self, req: CompletionRequest) -> list[SingleRequest]:
        self.tm.require_tokenizer("/v1/completions")
        return self._requests(await self._prompts(req.prompt), _params(req, req.max_tokens), req.n, _logprob_request(req))

    async def chat_requests(self, req: ChatCompletionRequest) -> list[SingleRequest]:
        self.tm.require_tokenizer("/v1/chat/completions")
        if not req.messages:
            raise InvalidRequest("Messages cannot be empty.")
        messages = msgspec.to_builtins(req.messages)
        for m in req.messages:
            self.tm.validator.texts(m.content if isinstance(m.content, str) else [p.text or "" for p in m.content or []] or "", "content")
        try:
            cont = req.continue_final_message
            text = self.tm.tokenizer.apply_chat_template(messages, add_generation_prompt=not cont, continue_final_message=cont, tokenize=False)
        except Exception as exc:
            raise InvalidRequest(f"could not apply the chat template: {exc}") from exc
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens > self.tm.context_len:
            # SGLang's text, missing space included.
            raise InvalidRequest(f"max_completion_tokens is too large: {max_tokens}.This model supports at most {self.tm.context_len} completion tokens.")
        ids = (await self.tm.encode([text], add_special_tokens=False))[0]
        return self._requests([ids], _params(req, max_tokens), req.n, _logprob_request(req))

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
            logprobs = None
            if single.logprob:
                meta = r["meta_info"]
                tokens, tops = meta["output_token_logprobs"], meta["output_top_logprobs"]
                if req.echo:
                    tokens, tops = meta["input_token_logprobs"] + tokens, meta["input_top_logprobs"] + tops
                logprobs = completion_logprobs(tokens, tops, 0)
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched})
        return self._envelope("cmpl", "text_completion", choices, self._usage(results, req.n))

    async def chat(self, req: ChatCompletionRequest, reqs: list[SingleRequest]) -> dict[str, Any]:
        results = await self.tm.run_all(reqs)
        choices = []
        for i, (r, single) in enumerate(zip(results, reqs)):
            meta = r["meta_info"]
            reason, matched = _finish(meta)
            message = {"role": "assistant", "content": r["text"], "tool_calls": None, "reasoning_content": None}
            logprobs = chat_logprobs(meta["output_token_logprobs"], meta["output_top_logprobs"]) if single.logprob else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched})
        return self._envelope("chatcmpl", "chat.completion", choices, self._usage(results, req.n))

    async def stream(self, obj: CompletionRequest | ChatCompletionRequest, reqs: list[SingleRequest], chat: bool) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks with text deltas; a chat stream opens each choice with the assistant role. With
        stream_options, each chunk (continuous_usage_stats) or a last one without choices (include_usage) has the usage."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        opts = obj.stream_options
        prompt_tokens = sum(len(r.input_ids) for r in reqs[:: obj.n])
        completion = [0] * len(reqs)
        usage = lambda: {"prompt_tokens": prompt_tokens, "completion_tokens": sum(completion), "total_tokens": prompt_tokens + sum(completion)}  # noqa: E731
        # A completion with echo starts each choice's text with its prompt.
        echo = [self.tm.tokenizer.decode(r.input_ids) if not chat and obj.echo else "" for r in reqs]
        sent = [0] * len(reqs)
        scored = [0] * len(reqs)  # output tokens whose logprobs went out
        offset = [0] * len(reqs)  # text_offset of the next token
        if chat:
            for i in range(len(reqs)):
                yield self._chunk(rid, kind, {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for out in self.tm.stream_all(reqs, is_batch=True):
            i = out["index"]
            delta, sent[i] = echo[i] + out["text"][sent[i] :], len(out["text"])
            echo[i] = ""
            completion[i] = out["meta_info"]["completion_tokens"]
            reason, matched = _finish(out["meta_info"])
            if not delta and reason is None:
                continue
            logprobs = None
            if reqs[i].logprob:
                meta = out["meta_info"]
                tokens, tops = meta["output_token_logprobs"][scored[i] :], meta["output_top_logprobs"][scored[i] :]
                scored[i] += len(tokens)
                logprobs = chat_logprobs(tokens, tops) if chat else completion_logprobs(tokens, tops, offset[i])
                offset[i] += sum(len(t[2]) for t in tokens)
            body = {"delta": {"content": delta}, "logprobs": logprobs} if chat else {"text": delta, "logprobs": logprobs}
            chunk = self._chunk(rid, kind, {"index": i, **body, "finish_reason": reason, "matched_stop": matched})
            if opts and opts.continuous_usage_stats:
                chunk["usage"] = usage()
            yield chunk
        if opts and opts.include_usage:
            yield {**self._chunk(rid, kind, {}), "choices": [], "usage": usage()}

    def _envelope(self, prefix: str, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.tm.served.name,
            "choices": choices,
            "usage": usage,
        }

    def _chunk(self, rid: str, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.tm.served.name, "choices": [choice]}

