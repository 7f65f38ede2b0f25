"""SGLang's native generation routes: /generate, /tokenize, /detokenize."""

from typing import Any

from litestar import Controller, Request, Response, post, route

from kiln.serving.api.context import ServingContext
from kiln.serving.api.errors import json_response
from kiln.serving.api.http_io import answer, read_body, sse
from kiln.serving.api.pooled_serving import require_kind
from kiln.serving.api.schemas import DetokenizeReqInput, GenerateReqInput, TokenizeReqInput

# /tokenize counts tokens of texts longer than any prompt, within reason.
TOKENIZE_TEXT_FACTOR = 8


class GenerateController(Controller):
    @route("/generate", http_method=["POST", "PUT"], status_code=200, opt={"body": GenerateReqInput})
    async def generate(self, request: Request, ctx: ServingContext) -> Any:
        obj: GenerateReqInput = await read_body(request)
        require_kind("/generate", ctx.kind, ("generation",))
        reqs, is_batch = await ctx.tm.parse(obj)
        if obj.stream:
            return await sse(request, ctx.tm.stream_all(reqs, is_batch))

        async def run() -> Any:
            results = await ctx.tm.run_all(reqs)
            return results if is_batch else results[0]

        return await answer(request, run())


class TokenizerController(Controller):
    @post("/tokenize", status_code=200, opt={"body": TokenizeReqInput})
    async def tokenize(self, request: Request, ctx: ServingContext) -> Response:
        obj: TokenizeReqInput = await read_body(request)
        is_batch, texts = ctx.tm.validator.texts(obj.prompt, "prompt", TOKENIZE_TEXT_FACTOR)
        toks = await ctx.tm.encode(texts, add_special_tokens=obj.add_special_tokens)
        if is_batch:
            return json_response({"tokens": toks, "count": [len(t) for t in toks], "max_model_len": ctx.tm.context_len})
        return json_response({"tokens": toks[0], "count": len(toks[0]), "max_model_len": ctx.tm.context_len})

    @post("/detokenize", status_code=200, opt={"body": DetokenizeReqInput})
    async def detokenize(self, request: Request, ctx: ServingContext) -> Response:
        obj: DetokenizeReqInput = await read_body(request)
        is_batch, seqs = ctx.tm.validator.token_ids(obj.tokens, "tokens") if obj.tokens else (False, [[]])
        texts = await ctx.tm.decode(seqs, skip_special_tokens=obj.skip_special_tokens)
        return json_response({"text": texts if is_batch else texts[0]})
