"""Wires one server together: engine process, tokenizer manager, HTTP app."""

import asyncio
import logging

from litestar import Litestar

from kiln.models.loader import default_model_path
from kiln.serving.engine_client import EngineClient
from kiln.serving.http_server import build_app
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer
from kiln.serving.tokenizer_manager import SingleRequest, TokenizerManager

log = logging.getLogger("kiln")


def create_app(args: ServerArgs) -> Litestar:
    engine = EngineClient(args)
    info = engine.info
    tokenizer = load_tokenizer(args.tokenizer_path or info["checkpoint"])
    tm = TokenizerManager(engine, tokenizer, args.weight_version)
    model_path = args.model_path or str(default_model_path())
    model_info = {
        "model_path": model_path,
        "tokenizer_path": args.tokenizer_path or model_path,
        "is_generation": info["model_kind"] == "generation",
        "preferred_sampling_params": None,
        "weight_version": args.weight_version,
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "model_type": info["model_type"],
        "architectures": info["architectures"],
    }
    app = build_app(args, engine, tm, model_info)

    async def warmup() -> None:
        if args.skip_server_warmup:
            return
        out = await asyncio.wait_for(tm.run_one(SingleRequest("WARMUP", [0], SamplingParams(max_new_tokens=1))), 300)
        if out["meta_info"]["finish_reason"]["type"] == "abort":
            raise RuntimeError(f"warm-up request failed: {out['meta_info']['finish_reason']}")

    async def ready() -> None:
        log.info(
            "max_total_num_tokens=%d, max_running_requests=%d, context_len=%d; serving on http://%s:%d",
            info["max_total_num_tokens"], info["max_running_requests"], info["context_length"], args.host, args.port,
        )  # fmt: skip

    app.on_startup.extend([warmup, ready])
    return app
