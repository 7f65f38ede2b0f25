"""Health, model and server info, load, and the routes that change server state (/flush_cache, /abort_request)."""

import asyncio
import time

import msgspec
from litestar import Controller, Request, Response, get, post

from kiln import __version__
from kiln.serving.api.context import ServingContext
from kiln.serving.api.errors import EngineUnavailable, json_response
from kiln.serving.api.http_io import read_body
from kiln.serving.api.schemas import AbortReqInput
from kiln.serving.sampling_params import InvalidRequest, SamplingParams

FLUSH_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)
HEALTH_TIMEOUT_S = 20


class InfoController(Controller):
    @get("/health")
    async def health(self, ctx: ServingContext) -> Response:
        ok = ctx.engine.alive and ctx.engine.unavailable is None
        return Response(content=b"", status_code=200 if ok else 503)

    @get("/health_generate")
    async def health_generate(self, ctx: ServingContext) -> Response:
        if not ctx.engine.alive or ctx.engine.unavailable is not None:
            return Response(content=b"", status_code=503)
        probe = ctx.tm.single(f"HEALTH_CHECK_{time.time_ns()}", [0], SamplingParams(max_new_tokens=1, temperature=0))
        try:
            result = await asyncio.wait_for(ctx.tm.run_one(probe), timeout=HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, EngineUnavailable):
            return Response(content=b"", status_code=503)
        ok = result["meta_info"]["finish_reason"]["type"] != "abort"
        return Response(content=b"", status_code=200 if ok else 503)

    @get(["/get_model_info", "/model_info"])
    async def model_info(self, ctx: ServingContext) -> Response:
        return json_response(ctx.model_info)

    @get(["/get_server_info", "/server_info"])
    async def server_info(self, ctx: ServingContext) -> Response:
        info = msgspec.to_builtins(ctx.engine.info)
        limits = info.pop("limits")
        info |= {"max_total_num_tokens": limits["max_total_tokens"], "context_length": limits["context_length"], "model_kind": limits["kind"]}
        try:
            info |= msgspec.to_builtins(await ctx.engine.stats(timeout=5))
        except (asyncio.TimeoutError, EngineUnavailable):
            pass  # the static figures still answer
        info.pop("type", None)
        return json_response({**ctx.args.public_dict(), **info, "internal_states": [info], "version": __version__})

    @get("/get_load")
    async def get_load(self, ctx: ServingContext) -> Response:
        stats = await ctx.engine.stats(timeout=5)
        used = ctx.engine.info.limits.max_total_tokens - stats.free_slots
        return json_response([{"dp_rank": 0, "num_running_reqs": stats.num_running_reqs, "num_waiting_reqs": stats.num_waiting_reqs, "num_tokens": used}])


class StateController(Controller):
    @post("/flush_cache", status_code=200)
    async def flush_cache(self, ctx: ServingContext) -> Response:
        flushed = await ctx.engine.flush_cache()
        return Response(content=FLUSH_MESSAGE, status_code=200 if flushed else 400, media_type="text/plain")

    @post("/abort_request", status_code=200, opt={"body": AbortReqInput})
    async def abort_request(self, request: Request, ctx: ServingContext) -> Response:
        body: AbortReqInput = await read_body(request)
        if not body.abort_all and not body.rid:
            raise InvalidRequest("abort_request needs rid or abort_all.")
        ctx.engine.abort("" if body.abort_all else body.rid)
        return Response(content=b"", status_code=200)
