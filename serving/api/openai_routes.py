"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/responses."""

from typing import Any

from litestar import Controller, Request, Response, get, post

from kiln.serving.api.context import ServingContext
from kiln.serving.api.errors import json_response
from kiln.serving.api.http_io import answer, read_body, sse
from kiln.serving.api.pooled_serving import require_kind
from kiln.serving.api.responses import ResponsesServing
from kiln.serving.api.schemas import ChatCompletionRequest, CompletionRequest, ResponsesRequest


def _card(ctx: ServingContext) -> dict[str, Any]:
    return {
        "id": ctx.tm.served.name,
        "object": "model",
        "created": int(ctx.start_time),
        "owned_by": "kiln",
        "root": ctx.tm.served.path,
        "max_model_len": ctx.tm.context_len,
    }


class OpenAIController(Controller):
    @get("/v1/models")
    async def models(self, ctx: ServingContext) -> Response:
        return json_response({"object": "list", "data": [_card(ctx)]})

    @get("/v1/models/{model:path}")
    async def model(self, model: str, ctx: ServingContext) -> Response:
        """`client.models.retrieve(name)`; names may hold slashes (hub ids, paths: the SDK drops a leading one)."""
        name = model.lstrip("/")
        if name != ctx.tm.served.name.lstrip("/"):
            error = {"message": f"The model '{name}' does not exist", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
            return json_response({"error": error}, 404)
        return json_response(_card(ctx))

    @post("/v1/completions", status_code=200, opt={"body": CompletionRequest})
    async def completions(self, request: Request, ctx: ServingContext) -> Any:
        obj: CompletionRequest = await read_body(request)
        require_kind(request.url.path, ctx.kind, ("generation",))
        reqs = await ctx.oai.completion_requests(obj)
        if obj.stream:
            return await sse(request, ctx.oai.stream(obj, reqs, chat=False))
        return await answer(request, ctx.oai.completion(obj, reqs))

    @post("/v1/responses", status_code=200, opt={"body": ResponsesRequest})
    async def responses(self, request: Request, ctx: ServingContext) -> Any:
        obj: ResponsesRequest = await read_body(request)
        require_kind(request.url.path, ctx.kind, ("generation",))
        api = ResponsesServing(ctx.oai)
        reqs = await api.requests(obj)
        if obj.stream:
            return await sse(request, api.stream(obj, reqs))
        return await answer(request, api.create(obj, reqs))

    @post("/v1/chat/completions", status_code=200, opt={"body": ChatCompletionRequest})
    async def chat_completions(self, request: Request, ctx: ServingContext) -> Any:
        obj: ChatCompletionRequest = await read_body(request)
        require_kind(request.url.path, ctx.kind, ("generation",))
        reqs = await ctx.oai.chat_requests(obj)
        if obj.stream:
            return await sse(request, ctx.oai.stream(obj, reqs, chat=True))
        return await answer(request, ctx.oai.chat(obj, reqs))
