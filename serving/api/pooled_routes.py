"""Routes of models without generation (/encode, /classify, /v1/embeddings, /v1/rerank) and /v1/score."""

from litestar import Controller, Request, Response, post, route

from kiln.serving.api.context import ServingContext
from kiln.serving.api.http_io import answer, read_body
from kiln.serving.api.pooled_serving import require_kind
from kiln.serving.api.schemas import EmbeddingRequest, EncodeReqInput, RerankRequest, ScoreRequest
from kiln.serving.api.score import score


class PooledController(Controller):
    @route(["/encode", "/classify"], http_method=["POST", "PUT"], status_code=200, opt={"body": EncodeReqInput})
    async def encode(self, request: Request, ctx: ServingContext) -> Response:
        obj = await read_body(request)
        return await answer(request, ctx.pooled.encode(obj, request.url.path))

    @post("/v1/embeddings", status_code=200, opt={"body": EmbeddingRequest})
    async def embeddings(self, request: Request, ctx: ServingContext) -> Response:
        return await answer(request, ctx.pooled.embeddings(await read_body(request)))

    @route("/v1/rerank", http_method=["POST", "PUT"], status_code=200, opt={"body": RerankRequest})
    async def rerank(self, request: Request, ctx: ServingContext) -> Response:
        return await answer(request, ctx.pooled.rerank(await read_body(request)))

    @post("/v1/score", status_code=200, opt={"body": ScoreRequest})
    async def score_items(self, request: Request, ctx: ServingContext) -> Response:
        obj = await read_body(request)
        require_kind("/v1/score", ctx.kind, ("generation",))
        return await answer(request, score(ctx.tm, obj))
