"""OpenAI-compatible /v1/completions and /v1/chat/completions on top of the tokenizer manager."""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from kiln.serving.messages import LogprobRequest
from kiln.serving.openai_logprobs import chat_logprobs, completion_logprobs
from kiln.serving.protocol import ChatCompletionRequest, CompletionRequest
from kiln.serving.tokenizer_manager import BadRequest, SingleRequest, TokenizerManager

MAX_TOP_LOGPROBS = 20


def _logprob_request(req: CompletionRequest | ChatCompletionRequest) -> LogprobRequest | None:
    """Completions: logprobs=N (with echo, the prompt's too). Chat: logprobs=true and top_logprobs=N."""
    name, top = ("logprobs", req.logprobs) if isinstance(req, CompletionRequest) else ("top_logprobs", req.top_logprobs)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {top}.")
    if isinstance(req, CompletionRequest):
        return None if top is None else LogprobRequest(top_n=top, start_len=0 if req.echo else -1)
    if not req.logprobs:
        if top:
            raise BadRequest("top_logprobs needs logprobs set to true.")
        return None
    return LogprobRequest(top_n=top or 0)


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

    def _requests(self, prompts: list[list[int]], raw: dict[str, Any], n: int, logprob: LogprobRequest | None) -> list[SingleRequest]:
        reqs = []
        for ids in prompts:
            if raw["max_new_tokens"] is None:
                raw = {**raw, "max_new_tokens": max(self.tm.context_len - len(ids) - 1, 1)}
            params = self.tm.sampling_params(raw)
            self.tm.check_length(ids, params)
            for _ in range(n):
                reqs.append(SingleRequest(uuid.uuid4().hex, ids, params, logprob, logprob_text=True))
        return reqs

    def completion_requests(self, req: CompletionRequest) -> list[SingleRequest]:
        return self._requests(self._prompts(req.prompt), _params(req, req.max_tokens), req.n, _logprob_request(req))

    def chat_requests(self, req: ChatCompletionRequest) -> list[SingleRequest]:
        messages = [msgspec.structs.asdict(m) for m in req.messages]
        if not messages:
            raise BadRequest("messages must not be empty.")
        try:
            text = self.tm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            raise BadRequest(f"could not apply the chat template: {exc}") from exc
        ids = self.tm.tokenizer(text, add_special_tokens=False).input_ids
        return self._requests([ids], _params(req, req.max_completion_tokens or req.max_tokens), req.n, _logprob_request(req))

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

    async def stream(self, reqs: list[SingleRequest], chat: bool) -> AsyncIterator[dict[str, Any]]:
        """OpenAI chunks with text deltas; a chat stream opens each choice with the assistant role."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        sent = [0] * len(reqs)
        scored = [0] * len(reqs)  # output tokens whose logprobs went out
        offset = [0] * len(reqs)  # text_offset of the next token
        if chat:
            for i in range(len(reqs)):
                yield self._chunk(rid, kind, {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for out in self.tm.stream_all(reqs, is_batch=True):
            i = out["index"]
            delta, sent[i] = out["text"][sent[i] :], len(out["text"])
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

