"""The engine process: receives requests, steps the model, sends token ids back."""

import logging
import traceback
from multiprocessing.connection import Connection

import msgspec

from kiln.serving.engine_core import EngineCore
from kiln.serving.messages import (
    AbortRequest,
    EngineError,
    FlushCache,
    FlushReply,
    GenerateRequest,
    InfoReply,
    InfoRequest,
    Shutdown,
    StepOutput,
    ToEngine,
    TokenOutput,
)
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


def run_engine(args: ServerArgs, conn: Connection) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s engine] %(message)s")
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(ToEngine).decode
    send = lambda msg: conn.send_bytes(encode(msg))  # noqa: E731
    try:
        core = EngineCore(args)
    except Exception as exc:
        log.error("engine failed to start: %s", traceback.format_exc())
        send(EngineError(f"{type(exc).__name__}: {exc}"))
        return
    send(InfoReply(core.info()))
    while True:
        try:
            if not core.has_work:
                conn.poll(None)
            outputs: list[TokenOutput] = []
            while conn.poll(0):
                msg = decode(conn.recv_bytes())
                if isinstance(msg, GenerateRequest):
                    outputs += core.add(msg)
                elif isinstance(msg, AbortRequest):
                    outputs += core.abort(msg.rid)
                elif isinstance(msg, InfoRequest):
                    send(InfoReply(core.info()))
                elif isinstance(msg, FlushCache):
                    send(FlushReply(core.flush_cache()))
                elif isinstance(msg, Shutdown):
                    return
            if core.has_work:
                outputs += _step(core)
            if outputs:
                send(StepOutput(outputs))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return  # the HTTP process is gone


def _step(core: EngineCore) -> list[TokenOutput]:
    """One forward; a failure aborts the requests in flight instead of killing the engine."""
    try:
        return core.step()
    except Exception as exc:
        log.error("step failed: %s", traceback.format_exc())
        outputs = core.abort("")
        for out in outputs:
            out.finish_reason = {"type": "abort", "message": f"engine error: {type(exc).__name__}: {exc}"}
        return outputs

