"""Health, model and server info, load, metrics, and the routes that change server state (cache, abort, weights, pause)."""

import asyncio
import time
from typing import Literal

import msgspec
from litestar import Controller, Request, Response, get, post, route
from litestar.exceptions import NotFoundException

from kiln import __version__
from kiln.serving.api.context import ServingContext
from kiln.serving.api.engine_client import EngineUnavailable
from kiln.serving.api.errors import json_response
from kiln.serving.api.http_io import read_body
from kiln.serving.api.auth import ADMIN
from kiln.serving.api.metrics import CONTENT_TYPE
from kiln.serving.api.schemas import (
    AbortReqInput,
    ContinueGenerationReqInput,
    PauseGenerationReqInput,
    UpdateWeightFromDiskReqInput,
    UpdateWeightVersionReqInput,
)
from kiln.serving.sampling_params import InvalidRequest, SamplingParams

FLUSH_MESSAGE = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)
HEALTH_TIMEOUT_S = 20
# SGLang's plain-text answers, by recorder action.
EXPERT_DISTRIBUTION_REPLIES = {
    "start": "Start recording the expert distribution.\n",
    "stop": "Stop recording the expert distribution.\n",
    "dump": "Dump expert distribution record.\n",
}


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
        return json_response(ctx.tm.served.model_info())

    @get(["/get_server_info", "/server_info"])
    async def server_info(self, ctx: ServingContext) -> Response:
        """The settings, engine 0's figures at the top level (as SGLang's come from rank 0), and each engine's
        figures in `internal_states`, by dp rank."""
        try:
            stats = await ctx.engine.stats(timeout=5)
        except (asyncio.TimeoutError, EngineUnavailable):
            stats = None  # the static figures still answer
        states = []
        for rank, engine in enumerate(ctx.engine.engines):
            state = msgspec.to_builtins(engine.info)
            limits = state.pop("limits")
            state |= {"max_total_num_tokens": limits["max_total_tokens"], "context_length": limits["context_length"], "model_kind": limits["kind"]}
            if stats is not None:
                state |= msgspec.to_builtins(stats[rank])
            state.pop("type", None)
            states.append(state)
        internal = [{"dp_rank": rank, **state} for rank, state in enumerate(states)]
        return json_response({**ctx.args.public_dict(), **states[0], "internal_states": internal, "version": __version__})

    @get("/get_load")
    async def get_load(self, ctx: ServingContext) -> Response:
        """Each engine's load, by dp rank."""
        loads = []
        for rank, (engine, stats) in enumerate(zip(ctx.engine.engines, await ctx.engine.stats(timeout=5))):
            used = engine.info.limits.max_total_tokens - stats.free_slots
            loads.append({"dp_rank": rank, "num_running_reqs": stats.num_running_reqs, "num_waiting_reqs": stats.num_waiting_reqs, "num_tokens": used})
        return json_response(loads)

    @get("/get_weight_version")
    async def weight_version(self, ctx: ServingContext) -> Response:
        return json_response({"weight_version": ctx.tm.served.weight_version})

    @get("/metrics", include_in_schema=False)
    async def metrics(self, ctx: ServingContext) -> Response:
        if ctx.metrics is None:
            raise NotFoundException("Metrics are off; start the server with --enable-metrics.")
        try:
            stats = await ctx.engine.stats(timeout=5)
        except (asyncio.TimeoutError, EngineUnavailable):
            stats = None  # the request-side metrics still answer
        return Response(content=ctx.metrics.exposition(stats), media_type=CONTENT_TYPE)


class StateController(Controller):
    """Routes that change server state: the admin key opens them when one is set."""

    opt = {"auth": ADMIN}

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

    @post("/update_weights_from_disk", status_code=200, opt={"body": UpdateWeightFromDiskReqInput})
    async def update_weights_from_disk(self, request: Request, ctx: ServingContext) -> Response:
        """In-flight requests finish on the old weights (or are aborted), new ones wait; then the weights are
        copied in place and the cache flushed. While generation is paused, the update runs at once."""
        body: UpdateWeightFromDiskReqInput = await read_body(request)
        if body.abort_all_requests:
            ctx.engine.abort("")
        async with ctx.tm.gate.update():
            reply = await ctx.engine.update_weights(body.model_path, body.load_format, body.flush_cache)
            message = reply.message
            if reply.success:
                ctx.tm.served.weights_updated(body.model_path, body.weight_version)
                if body.weight_version is not None:
                    message += f" Weight version updated to {body.weight_version}."
        result = {"success": reply.success, "message": message, "num_paused_requests": 0}
        return json_response(result, 200 if reply.success else 400)

    @post("/update_weight_version", status_code=200, opt={"body": UpdateWeightVersionReqInput})
    async def update_weight_version(self, request: Request, ctx: ServingContext) -> Response:
        body: UpdateWeightVersionReqInput = await read_body(request)
        if body.abort_all_requests:
            ctx.engine.abort("")
        ctx.tm.served.weight_version = body.new_version
        message = f"Weight version updated to {body.new_version}"
        return json_response({"success": True, "message": message, "new_version": body.new_version})

    @post("/pause_generation", status_code=200, opt={"body": PauseGenerationReqInput, "empty_body": True})
    async def pause_generation(self, request: Request, ctx: ServingContext) -> Response:
        """New requests wait until /continue_generation; `abort` ends those in flight and returns once they
        have, `retract` frees their K/V (recomputed on continue), `in_place` keeps them as they are."""
        body: PauseGenerationReqInput = await read_body(request)
        ctx.tm.gate.pause()
        await ctx.engine.pause(body.mode)
        # A request past the gate may reach the engine just after the abort: abort again until none is left.
        while body.mode == "abort" and not await ctx.tm.gate.drained(timeout=1.0):
            ctx.engine.abort("")
        return json_response({"message": "Generation paused successfully.", "status": "ok"})

    @post("/continue_generation", status_code=200, opt={"body": ContinueGenerationReqInput, "empty_body": True})
    async def continue_generation(self, request: Request, ctx: ServingContext) -> Response:
        await read_body(request)
        await ctx.engine.resume()
        ctx.tm.gate.resume()
        return json_response({"message": "Generation continued successfully.", "status": "ok"})

    @route("/start_expert_distribution_record", http_method=["GET", "POST"], status_code=200)
    async def start_expert_distribution_record(self, ctx: ServingContext) -> Response:
        """Counts from zero the tokens each MoE layer routes to each expert (again from zero if already counting)."""
        return await _expert_distribution(ctx, "start")

    @route("/stop_expert_distribution_record", http_method=["GET", "POST"], status_code=200)
    async def stop_expert_distribution_record(self, ctx: ServingContext) -> Response:
        """Stops counting; the counts so far wait for the next dump."""
        return await _expert_distribution(ctx, "stop")

    @route("/dump_expert_distribution_record", http_method=["GET", "POST"], status_code=200)
    async def dump_expert_distribution_record(self, ctx: ServingContext) -> Response:
        """Writes the counts (a torch.save file and a CSV under --expert-distribution-recorder-dir), then zeroes them."""
        return await _expert_distribution(ctx, "dump")


async def _expert_distribution(ctx: ServingContext, action: Literal["start", "stop", "dump"]) -> Response:
    reply = await ctx.engine.expert_distribution(action)
    if not reply.success:
        # SGLang's scheduler raises this message and takes the server down; here it is the client's 400.
        raise InvalidRequest(reply.message)
    return Response(content=EXPERT_DISTRIBUTION_REPLIES[action], status_code=200, media_type="text/plain")
