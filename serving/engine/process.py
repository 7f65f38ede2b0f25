"""The engine process: receives requests, steps the model, sends token ids back."""

import logging
import signal
import sys
import traceback
from multiprocessing.connection import Connection, wait

import msgspec

from kiln.serving.engine.core import EngineCore
from kiln.serving.engine.step_channel import HEARTBEAT_S, RankGone
from kiln.serving.engine.tp_ranks import TensorParallelRanks
from kiln.serving.messages import (
    AbortRequest,
    CheckpointLocated,
    ContinueGeneration,
    ControlReply,
    ExpertDistribution,
    EngineError,
    FinishAbort,
    FlushCache,
    GenerateRequest,
    PauseGeneration,
    Shutdown,
    StatsRequest,
    StepOutput,
    ToEngine,
    TokenOutput,
    UpdateWeights,
)
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


def run_engine(args: ServerArgs, conn: Connection, dp_rank: int = 0) -> None:
    # The HTTP process decides when the engine stops (a SIGTERM to the process group must let it drain
    # first); the engine also ends when the HTTP process's end of the pipe closes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name = "engine" if args.dp_size == 1 else f"engine dp{dp_rank}"
    logging.basicConfig(level=args.log_level.upper(), format=f"[%(asctime)s {name}] %(message)s")
    send = lambda msg: conn.send_bytes(msgspec.msgpack.encode(msg))  # noqa: E731
    ranks = None
    try:
        ranks = TensorParallelRanks.start(args, dp_rank) if args.tp_size > 1 else None
        core = EngineCore(args, ranks.channel if ranks else None, on_located=lambda path, has: send(CheckpointLocated(str(path), has)))
    except BaseException as exc:
        log.error("engine failed to start: %s", traceback.format_exc())
        send(EngineError(f"{type(exc).__name__}: {exc}"))
        if ranks:
            ranks.stop(graceful=False)  # they may be anywhere in their start-up
        return
    send(core.engine_info())
    try:
        _serve(core, conn, ranks)
    except RankGone as exc:
        log.error("%s: the engine stops", ranks.explain(exc))
        ranks.stop(graceful=False)
        sys.exit(1)
    if ranks:
        ranks.stop()


def _serve(core: EngineCore, conn: Connection, ranks: TensorParallelRanks | None) -> None:
    """Until Shutdown or the HTTP process's end of the pipe closes. Idle, it waits on the pipe and, with
    tensor parallelism, on its node's ranks (one exiting raises RankGone), sending the ranks a heartbeat
    every HEARTBEAT_S."""
    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder(ToEngine).decode
    send = lambda msg: conn.send_bytes(encode(msg))  # noqa: E731
    while True:
        try:
            if not core.has_work or core.paused:
                if ranks is None:
                    conn.poll(None)
                elif not wait([conn, *ranks.exit_fds], HEARTBEAT_S):
                    ranks.heartbeat()
            if ranks is not None:
                ranks.check()
            outputs: list[TokenOutput] = []
            while conn.poll(0):
                msg = decode(conn.recv_bytes())
                if isinstance(msg, GenerateRequest):
                    outputs += _add(core, msg)
                elif isinstance(msg, AbortRequest):
                    outputs += core.abort(msg.rid, msg.message)
                elif isinstance(msg, StatsRequest):
                    send(core.stats())
                elif isinstance(msg, FlushCache):
                    send(ControlReply(core.flush_cache()))
                elif isinstance(msg, UpdateWeights):
                    send(core.update_weights(msg))
                elif isinstance(msg, PauseGeneration):
                    outputs += core.pause(msg.mode)
                    send(ControlReply(True))
                elif isinstance(msg, ContinueGeneration):
                    core.resume()
                    send(ControlReply(True))
                elif isinstance(msg, ExpertDistribution):
                    send(core.expert_distribution(msg))
                elif isinstance(msg, Shutdown):
                    return
            if core.has_work and not core.paused:
                outputs += core.step()
            if outputs:
                send(StepOutput(outputs))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            return  # the HTTP process is gone


def _add(core: EngineCore, msg: GenerateRequest) -> list[TokenOutput]:
    """Queues one request; whatever it carries, a failure ends that request alone."""
    try:
        return core.add(msg)
    except Exception as exc:
        log.error("could not queue request %s: %s", msg.rid, traceback.format_exc())
        return [TokenOutput(msg.rid, [], len(msg.input_ids), 0, FinishAbort(f"engine error: {type(exc).__name__}: {exc}"))]
