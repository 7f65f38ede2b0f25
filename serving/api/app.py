"""Wires the HTTP process together: engines, tokenizer side, validator, controllers."""

import asyncio
import logging
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.di import Provide

from kiln.serving.api.admin_routes import InfoController, StateController
from kiln.serving.api.auth import auth_guard
from kiln.serving.api.context import ServingContext
from kiln.serving.api.engine_group import EngineGroup
from kiln.serving.api.errors import EXCEPTION_HANDLERS, error_response, json_response
from kiln.serving.api.native_routes import GenerateController, TokenizerController
from kiln.serving.api.openai_routes import OpenAIController
from kiln.serving.api.openai_serving import OpenAIServing
from kiln.serving.api.openapi import openapi_document
from kiln.serving.api.pooled_routes import PooledController
from kiln.serving.api.metrics import ServingMetrics
from kiln.serving.api.pooled_serving import EmbeddingServing
from kiln.serving.api.served_model import ServedModel
from kiln.serving.api.tokenizer_manager import TokenizerManager
from kiln.serving.api.validator import Validator
from kiln.serving.messages import CheckpointLocated
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer

log = logging.getLogger("kiln")

def guards(*hooks: Any) -> Any:
    """One before_request hook running several: the first answer stops the request."""

    async def run(request: Request) -> Response | None:
        for hook in hooks:
            response = await hook(request)
            if response is not None:
                return response
        return None

    return run


def origin_guard(allowed: tuple[str, ...]) -> Any:
    """Refuses requests that change state from a web page of another origin (browsers send Origin; curl does not)."""

    async def guard(request: Request) -> Response | None:
        origin = request.headers.get("origin")
        if origin is None or request.method in ("GET", "HEAD", "OPTIONS") or origin in allowed or "*" in allowed:
            return None
        return error_response(request, f"Origin {origin!r} is not allowed; start the server with --cors-allow-origins {origin}.", 403)

    return guard


@get(["/openapi.json", "/schema/openapi.json"], opt={"openapi": False}, include_in_schema=False)
async def openapi(request: Request) -> Response:
    return json_response(openapi_document(request.app))


def load_http_tokenizer(args: ServerArgs, located: CheckpointLocated) -> Any:
    """The HTTP side's tokenizer, loaded while the engine loads its weights and compiles. The engine decides
    whether there is one (--skip-tokenizer-init, or a dummy model without tokenizer files); this side follows."""
    return load_tokenizer(args.tokenizer_path or located.checkpoint) if located.has_tokenizer else None


def create_app(args: ServerArgs, engine: EngineGroup, tokenizer: Any) -> Litestar:
    """The app around ready engines; `tokenizer` from load_http_tokenizer."""
    info = engine.info
    validator = Validator.for_tokenizer(info.limits, args.max_n, tokenizer)
    served = ServedModel.for_args(args, info)
    metrics = ServingMetrics(served.name, args.dp_size) if args.enable_metrics else None
    tm = TokenizerManager(engine, tokenizer, validator, served, metrics, args.incremental_streaming_output)
    ctx = ServingContext(args, engine, tm, OpenAIServing(tm), EmbeddingServing(tm, info.model_kind), metrics)

    async def start_reader() -> None:
        engine.start_reader(asyncio.get_running_loop())

    async def warmup() -> None:
        if args.skip_server_warmup:
            return
        # One probe per engine: prompts shorter than a routing block go to the least loaded engine, so
        # probes sent together spread one to each. Two prompt tokens and two new ones run a prefill bucket and
        # a decode bucket (a one-token prompt would run only the latter), so a broken prefill fails here.
        probes = [
            tm.single("WARMUP" if rank == 0 else f"WARMUP_{rank}", [rank, rank], SamplingParams(max_new_tokens=2, ignore_eos=True))
            for rank in range(args.dp_size)
        ]
        for out in await asyncio.wait_for(tm.run_all(probes), 300):
            if out["meta_info"]["finish_reason"]["type"] == "abort":
                raise RuntimeError(f"warm-up request failed: {out['meta_info']['finish_reason']}")

    async def ready() -> None:
        log.info(
            "max_total_num_tokens=%d, max_running_requests=%d, context_len=%d; serving on http://%s:%d",
            info.limits.max_total_tokens, info.max_running_requests, info.limits.context_length, args.host, args.port,
        )  # fmt: skip

    origins = tuple(args.cors_allow_origins)
    return Litestar(
        route_handlers=[
            GenerateController, TokenizerController, InfoController, StateController, OpenAIController, PooledController, openapi,
        ],  # fmt: skip
        dependencies={"ctx": Provide(lambda: ctx, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        before_request=guards(auth_guard(args.api_key, args.admin_api_key), origin_guard(origins)),
        cors_config=CORSConfig(allow_origins=list(origins)) if origins else None,
        on_startup=[start_reader, warmup, ready],
        on_shutdown=[engine.shutdown],
        request_max_body_size=args.max_request_body_mb << 20,
        openapi_config=None,
    )
