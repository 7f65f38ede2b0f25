"""OpenAI's Responses API (/v1/responses) for text: the input becomes a chat, the chat runs as
/v1/chat/completions does, and the answer is one assistant message of `output_text`.

Nothing is stored (`previous_response_id` is refused), and tools are not run.
"""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from kiln.serving.api.openai_serving import OpenAIServing
from kiln.serving.api.schemas import ChatCompletionRequest, ChatMessage, ContentPart, JsonSchemaFormat, ResponseFormat, ResponsesRequest
from kiln.serving.api.tokenizer_manager import SingleRequest
from kiln.serving.sampling_params import InvalidRequest


def chat_request(obj: ResponsesRequest) -> ChatCompletionRequest:
    if obj.previous_response_id is not None:
        raise InvalidRequest("previous_response_id is not supported: this server stores no responses.")
    messages = [] if obj.instructions is None else [ChatMessage("system", obj.instructions)]
    if isinstance(obj.input, str):
        messages.append(ChatMessage("user", obj.input))
    else:
        for item in obj.input:
            parts = item.content if isinstance(item.content, str) else [ContentPart("text", p.text or "") for p in item.content]
            messages.append(ChatMessage(item.role, parts))
    fmt = obj.text.format if obj.text is not None else None
    response_format = None
    if fmt is not None and fmt.type != "text":
        schema = JsonSchemaFormat(fmt.name, fmt.schema, fmt.strict, fmt.description) if fmt.type == "json_schema" else None
        response_format = ResponseFormat(fmt.type, schema)
    return ChatCompletionRequest(
        messages=messages, max_tokens=obj.max_output_tokens, temperature=obj.temperature, top_p=obj.top_p,
        response_format=response_format, stream=obj.stream, model=obj.model,
    )  # fmt: skip


class ResponsesServing:
    def __init__(self, oai: OpenAIServing):
        self.oai = oai
        self.tm = oai.tm

    def _response(self, obj: ResponsesRequest, rid: str, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
        fmt = {"type": "text"} if obj.text is None or obj.text.format is None else {"type": obj.text.format.type}
        return {
            "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "instructions": obj.instructions, "max_output_tokens": obj.max_output_tokens, "model": self.tm.served.name,
            "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": obj.temperature,
            "text": {"format": fmt}, "tool_choice": "auto", "tools": [], "top_p": obj.top_p, "truncation": "disabled",
            "usage": usage, "user": obj.user, "metadata": obj.metadata or {},
        }  # fmt: skip

    @staticmethod
    def _message(mid: str, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def _usage(meta: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = meta["prompt_tokens"], meta["completion_tokens"]
        return {
            "input_tokens": prompt, "input_tokens_details": {"cached_tokens": meta["cached_tokens"]},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion,
        }  # fmt: skip

    async def requests(self, obj: ResponsesRequest) -> list[SingleRequest]:
        return await self.oai.chat_requests(chat_request(obj))

    async def create(self, obj: ResponsesRequest, reqs: list[SingleRequest]) -> dict[str, Any]:
        (result,) = await self.tm.run_all(reqs)
        meta = result["meta_info"]
        reason = meta["finish_reason"]["type"]
        status = "completed" if reason == "stop" else "incomplete"
        message = self._message(f"msg_{uuid.uuid4().hex}", result["text"], status)
        return self._response(obj, f"resp_{uuid.uuid4().hex}", status, [message], self._usage(meta), reason)

    async def stream(self, obj: ResponsesRequest, reqs: list[SingleRequest]) -> AsyncIterator[dict[str, Any]]:
        """The Responses API's events for one text message, each with its sequence_number."""
        rid, mid = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        seq = iter(range(1 << 62))
        event = lambda kind, **fields: {"type": kind, "sequence_number": next(seq), **fields}  # noqa: E731
        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        yield event("response.created", response=self._response(obj, rid, "in_progress", [], None, None))
        yield event("response.in_progress", response=self._response(obj, rid, "in_progress", [], None, None))
        yield event("response.output_item.added", output_index=0, item={**self._message(mid, "", "in_progress"), "content": []})
        yield event("response.content_part.added", **where, part={"type": "output_text", "text": "", "annotations": []})
        sent, text, meta = 0, "", {}
        async for out in self.tm.stream_all(reqs, is_batch=False):
            meta, text = out["meta_info"], out["text"]
            delta, sent = text[sent:], len(text)
            if delta:
                yield event("response.output_text.delta", **where, delta=delta, logprobs=[])
        reason = meta["finish_reason"]["type"]
        status = "completed" if reason == "stop" else "incomplete"
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part={"type": "output_text", "text": text, "annotations": []})
        message = self._message(mid, text, status)
        yield event("response.output_item.done", output_index=0, item=message)
        final = self._response(obj, rid, status, [message], self._usage(meta), reason)
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
