"""The Litestar app: SGLang's native endpoints (and /v1/models) over the tokenizer manager."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post, route
from litestar.exceptions import HTTPException
from litestar.response import Stream

from kiln import __version__
from kiln.models.registry import GENERATION
from kiln.serving.embedding_api import EmbeddingServing, require_kind
from kiln.serving.embedding_protocol import EmbeddingRequest, EncodeReqInput, RerankRequest, ScoreRequest
from kiln.serving.engine_client import EngineClient
from kiln.serving.openai_api import OpenAIServing
from kiln.serving.protocol import AbortReqInput, ChatCompletionRequest, CompletionRequest, DetokenizeReqInput, GenerateReqInput, TokenizeReqInput
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.score_api import score
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer_manager import BadRequest, SingleRequest, TokenizerManager

log = logging.getLogger(__name__)

FLUSH_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


def json_response(content: Any, status: int = 200) -> Response:
    return Response(content=msgspec.json.encode(content), status_code=status, media_type="application/json")


def error_response(request: Request, message: str, status: int = 400) -> Response:
    if request.url.path.startswith("/v1/"):
        body = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
        return json_response(body, status)
    return json_response({"error": {"message": message}}, status)


async def decode_body(request: Request, schema: type) -> Any:
    body = await request.body()
    if not body:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return msgspec.json.decode(body, type=schema)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc


def sse(chunks: AsyncIterator[dict[str, Any]]) -> Stream:
    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        except BadRequest as exc:
            yield b"data: " + msgspec.json.encode({"error": {"message": str(exc)}}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    # The header, not media_type: Litestar lets the handler's JSON default override media_type.
    return Stream(events(), status_code=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Runs `work`; a client that hangs up first cancels it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnect(request))
    await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


def build_app(args: ServerArgs, engine: EngineClient, tm: TokenizerManager, model_info: dict[str, Any]) -> Litestar:
    served_name = args.served_model_name or model_info["model_path"]
    oai = OpenAIServing(tm, served_name)
    kind = engine.info["model_kind"]
    pooled = EmbeddingServing(tm, kind, served_name, min(tm.context_len, engine.info["chunked_prefill_size"]))

    @route("/generate", http_method=["POST", "PUT"], status_code=200)
    async def generate(request: Request) -> Any:
        obj = await decode_body(request, GenerateReqInput)
        require_kind("/generate", kind, (GENERATION,))
        reqs, is_batch = tm.parse(obj)
        if obj.stream:
            return sse(tm.stream_all(reqs, is_batch))
        results = await unless_disconnected(request, tm.run_all(reqs))
        if results is None:
            return Response(content=b"", status_code=499)
        return json_response(results if is_batch else results[0])

    @get("/health")
    async def health() -> Response:
        return Response(content=b"", status_code=200 if engine.alive else 503)

    @get("/health_generate")
    async def health_generate() -> Response:
        probe = SingleRequest(f"HEALTH_CHECK_{time.time_ns()}", [0], SamplingParams(max_new_tokens=1))
        try:
            result = await asyncio.wait_for(tm.run_one(probe), timeout=20)
        except asyncio.TimeoutError:
            return Response(content=b"", status_code=503)
        ok = engine.alive and result["meta_info"]["finish_reason"]["type"] != "abort"
        return Response(content=b"", status_code=200 if ok else 503)

    @get(["/get_model_info", "/model_info"])
    async def get_model_info() -> Response:
        return json_response(model_info)

    @get(["/get_server_info", "/server_info"])
    async def get_server_info() -> Response:
        try:
            info = await engine.refresh_info(timeout=5)
        except asyncio.TimeoutError:
            info = engine.info
        return json_response({**args.to_dict(), **info, "internal_states": [info], "version": __version__})

    @get("/get_load")
    async def get_load() -> Response:
        info = await engine.refresh_info(timeout=5)
        load = {k: info[k] for k in ("num_running_reqs", "num_waiting_reqs")}
        load["num_tokens"] = info["max_total_num_tokens"] - info["free_slots"]
        return json_response([{"dp_rank": 0, **load}])

    @route("/flush_cache", http_method=["GET", "POST"], status_code=200)
    async def flush_cache() -> Response:
        flushed = await engine.flush_cache()
        return Response(content=FLUSH_MESSAGE, status_code=200 if flushed else 400, media_type="text/plain")

    @post("/abort_request", status_code=200)
    async def abort_request(request: Request) -> Response:
        body = await decode_body(request, AbortReqInput)
        if body.abort_all:
            engine.abort("")
        elif body.rid:
            engine.abort(body.rid)
        else:
            raise BadRequest("abort_request needs rid or abort_all.")
        return Response(content=b"", status_code=200)

    @post("/tokenize", status_code=200)
    async def tokenize(request: Request) -> Response:
        obj = await decode_body(request, TokenizeReqInput)
        prompts = obj.prompt if isinstance(obj.prompt, list) else [obj.prompt]
        toks = [tm.tokenizer(p, add_special_tokens=obj.add_special_tokens).input_ids for p in prompts]
        if isinstance(obj.prompt, list):
            return json_response({"tokens": toks, "count": [len(t) for t in toks], "max_model_len": tm.context_len})
        return json_response({"tokens": toks[0], "count": len(toks[0]), "max_model_len": tm.context_len})

    @post("/detokenize", status_code=200)
    async def detokenize(request: Request) -> Response:
        obj = await decode_body(request, DetokenizeReqInput)
        is_batch = bool(obj.tokens) and isinstance(obj.tokens[0], list)
        seqs = obj.tokens if is_batch else [obj.tokens]
        for seq in seqs:
            if not isinstance(seq, list) or not all(type(t) is int and 0 <= t < tm.vocab_size for t in seq):
                raise BadRequest(f"tokens must be token ids in [0, {tm.vocab_size}), or a list of such lists.")
        texts = [tm.tokenizer.decode(s, skip_special_tokens=obj.skip_special_tokens) for s in seqs]
        return json_response({"text": texts if is_batch else texts[0]})

    async def openai_call(request: Request, schema: type, build: Any, run: Any, chat: bool) -> Any:
        obj = await decode_body(request, schema)
        require_kind(request.url.path, kind, (GENERATION,))
        reqs = build(obj)
        if obj.stream:
            return sse(oai.stream(reqs, chat=chat))
        return json_response(await unless_disconnected(request, run(obj, reqs)))

    @post("/v1/completions", status_code=200)
    async def completions(request: Request) -> Any:
        return await openai_call(request, CompletionRequest, oai.completion_requests, oai.completion, chat=False)

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(request: Request) -> Any:
        return await openai_call(request, ChatCompletionRequest, oai.chat_requests, oai.chat, chat=True)

    async def answer(request: Request, work: Any) -> Response:
        result = await unless_disconnected(request, work)
        return Response(content=b"", status_code=499) if result is None else json_response(result)

    @route(["/encode", "/classify"], http_method=["POST", "PUT"], status_code=200)
    async def encode(request: Request) -> Response:
        obj = await decode_body(request, EncodeReqInput)
        return await answer(request, pooled.encode(obj, request.url.path))

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request) -> Response:
        return await answer(request, pooled.embeddings(await decode_body(request, EmbeddingRequest)))

    @post("/v1/rerank", status_code=200)
    async def rerank(request: Request) -> Response:
        return await answer(request, pooled.rerank(await decode_body(request, RerankRequest)))

    @post("/v1/score", status_code=200)
    async def score_items(request: Request) -> Response:
        obj = await decode_body(request, ScoreRequest)
        require_kind("/v1/score", kind, (GENERATION,))
        return await answer(request, score(tm, obj, served_name))

    @get("/v1/models")
    async def models() -> Response:
        card = {
            "id": served_name,
            "object": "model",
            "created": int(start_time),
            "owned_by": "kiln",
            "root": model_info["model_path"],
            "max_model_len": tm.context_len,
        }
        return json_response({"object": "list", "data": [card]})

    def on_bad_request(request: Request, exc: BadRequest) -> Response:
        return error_response(request, str(exc))

    def on_http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(request, exc.detail, exc.status_code)

    async def start_reader() -> None:
        engine.start_reader(asyncio.get_running_loop())

    start_time = time.time()
    return Litestar(
        route_handlers=[
            generate, health, health_generate, get_model_info, get_server_info, get_load,
            flush_cache, abort_request, tokenize, detokenize, completions, chat_completions, models,
            encode, embeddings, rerank, score_items,
        ],  # fmt: skip
        exception_handlers={BadRequest: on_bad_request, HTTPException: on_http_error},
        on_startup=[start_reader],
        on_shutdown=[lambda: engine.shutdown()],
        request_max_body_size=64 * 1024 * 1024,
    )
