"""The HTTP process's handle on one engine process: start it, send requests, route outputs, notice its death."""

import asyncio
import logging
import multiprocessing as mp
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec

from kiln.serving.messages import (
    AbortRequest,
    CheckpointLocated,
    ContinueGeneration,
    ControlReply,
    ExpertDistribution,
    EngineError,
    EngineInfo,
    EngineStats,
    FinishAbort,
    FlushCache,
    FromEngine,
    GenerateRequest,
    PauseGeneration,
    PauseMode,
    Shutdown,
    StatsRequest,
    StepOutput,
    TokenOutput,
    UpdateWeights,
)
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)

# The engine process's entry point, named rather than imported: importing it would load torch here.
ENGINE_ENTRY = "kiln.serving.engine.process:run_engine"


class EngineStartError(RuntimeError):
    pass


class EngineUnavailable(RuntimeError):
    """The engine process is gone (or the server is shutting down): a 503 (errors.on_unavailable)."""


def _run_engine(args: ServerArgs, conn: Any, dp_rank: int) -> None:
    import importlib

    set_openmp_spin(args)
    module, name = ENGINE_ENTRY.split(":")
    getattr(importlib.import_module(module), name)(args, conn, dp_rank)


def set_openmp_spin(args: ServerArgs) -> None:
    """The engine process's OpenMP spin count, which libgomp reads once, when torch loads it: so before the engine
    imports torch. Without it libgomp spins 3 ms (no OMP_WAIT_POLICY), stealing a small machine's cores from the
    HTTP side, or not at all (PASSIVE), and then every parallel region of a step waits for sleeping threads to
    wake: on a 2-vCPU VM that made batch-1 decode steps 1.3-3x slower and a 2-thread kernel slower than 1 thread.
    A user's own setting wins; tensor-parallel ranks inherit the environment."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(args.omp_spin_count)


class EngineClient:
    """Starts engine process `dp_rank`; `generate` yields its TokenOutputs for one request.

    The process starts at construction and `wait_ready` waits for its EngineInfo, so that several engines
    start at once. Each request id in flight here has a queue for its outputs. When the engine process
    dies, every request in flight ends with a 503 abort and `on_death` is called (the server then exits,
    so a supervisor restarts it).
    """

    def __init__(self, args: ServerArgs, dp_rank: int = 0):
        self.name = "the engine process" if args.dp_size == 1 else f"engine process dp{dp_rank}"
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_run_engine, args=(args, child, dp_rank), daemon=True, name=f"kiln-engine-dp{dp_rank}")
        self.process.start()
        child.close()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(FromEngine).decode
        self._send_lock = threading.Lock()
        self.located: CheckpointLocated | None = None
        self.info: EngineInfo | None = None
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        # The engine answers StatsRequest and the control messages in the order they were sent.
        self._replies: deque[asyncio.Future[Any]] = deque()
        self.unavailable: str | None = None  # why new requests are refused (shutdown, engine death)
        self.dead = False
        self._stopping = False  # we asked the engine to stop: its exit is no death
        self.on_death: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wait_located(self) -> CheckpointLocated:
        """Blocks until the engine has found its checkpoint (before it loads weights); EngineStartError if it could not."""
        if self.located is None:
            self.located = self._expect(CheckpointLocated)
        return self.located

    def wait_ready(self) -> EngineInfo:
        """Blocks until the engine has loaded its model; EngineStartError if it could not."""
        self.wait_located()
        self.info = self._expect(EngineInfo)
        return self.info

    def _expect(self, kind: type[Any]) -> Any:
        msg = self._recv_blocking()
        if not isinstance(msg, kind):
            raise EngineStartError(msg.message if isinstance(msg, EngineError) else f"{self.name} exited during start-up")
        return msg

    def _recv_blocking(self) -> Any:
        try:
            return self._decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None

    def _send(self, msg: Any) -> None:
        if self.dead:
            raise EngineUnavailable("The engine process is not running; the server is exiting.")
        try:
            with self._send_lock:
                self._conn.send_bytes(self._encode(msg))
        except OSError as exc:
            raise EngineUnavailable("The engine process is not running; the server is exiting.") from exc

    def start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Routes engine output to the waiting coroutines of `loop` (call once, from that loop)."""
        self._loop = loop
        threading.Thread(target=self._read_forever, daemon=True, name="kiln-engine-reader").start()

    def _read_forever(self) -> None:
        while True:
            msg = self._recv_blocking()
            if msg is None:
                self._loop.call_soon_threadsafe(self._engine_died)
                return
            self._loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, StepOutput):
            for out in msg.outputs:
                queue = self._queues.get(out.rid)
                if queue is not None:
                    queue.put_nowait(out)
        elif isinstance(msg, (EngineStats, ControlReply)):
            fut = self._replies.popleft()
            if not fut.done():  # its caller may have timed out
                fut.set_result(msg)
        elif isinstance(msg, EngineError):
            log.error("%s: %s", self.name, msg.message)

    def _engine_died(self) -> None:
        if self._stopping:
            return
        self.dead = True
        self.unavailable = "The engine process exited; the server is shutting down."
        self.process.join(timeout=0.5)  # the pipe closes just before the process is reaped
        log.error("%s exited (exit code %s); failing %d requests", self.name, self.process.exitcode, len(self._queues))
        self.fail_in_flight("The engine process exited.")
        for fut in self._replies:
            if not fut.done():
                fut.set_exception(EngineUnavailable(self.unavailable))
        if self.on_death is not None:
            self.on_death()

    def fail_in_flight(self, message: str) -> None:
        """Ends every request in flight with a 503 abort (its engine, or another of the group, is gone)."""
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid, [], 0, 0, FinishAbort(message, 503)))

    @property
    def alive(self) -> bool:
        return not self.dead and self.process.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def open(self, rid: str) -> asyncio.Queue[TokenOutput]:
        """Registers the id of a request about to be sent (the group has checked that no other request holds it)."""
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[rid] = queue
        return queue

    def close(self, rid: str, queue: asyncio.Queue[TokenOutput]) -> None:
        """Forgets an opened id whose request was never sent or has ended."""
        if self._queues.get(rid) is queue:
            del self._queues[rid]

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Sends an opened request and yields its outputs until the finishing one; leaving early aborts it."""
        queue = self._queues[req.rid]
        finished = False
        try:
            self._send(req)
            while not finished:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
        finally:
            if self._queues.get(req.rid) is queue:
                del self._queues[req.rid]
            if not finished and not self.dead:
                self._send(AbortRequest(req.rid))

    def abort(self, rid: str, message: str | None = None) -> None:
        """Aborts the requests in flight here with id `rid` or the n copies `rid-0`, `rid-1`, ... it was split
        into, or every request for rid ""."""
        targets = [r for r in self._queues if r == rid or r.startswith(rid + "-") and r[len(rid) + 1 :].isdigit()] if rid else [rid]
        for target in targets:
            self._send(AbortRequest(target, message))

    async def _ask(self, msg: Any, timeout: float | None) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._send(msg)
        self._replies.append(fut)
        # A timed-out wait leaves the future in the queue: the late reply still pairs with it.
        return await asyncio.wait_for(asyncio.shield(fut), timeout)

    async def stats(self, timeout: float = 10.0) -> EngineStats:
        return await self._ask(StatsRequest(), timeout)

    async def flush_cache(self, timeout: float = 10.0) -> bool:
        """Empties the radix cache; False (and nothing flushed) while requests run or wait."""
        return (await self._ask(FlushCache(), timeout)).success

    async def update_weights(self, model_path: str, load_format: str | None, flush_cache: bool) -> ControlReply:
        """Loads a checkpoint's weights into the served model (no timeout: a big checkpoint takes minutes)."""
        return await self._ask(UpdateWeights(model_path, load_format, flush_cache), None)

    async def pause(self, mode: PauseMode) -> None:
        await self._ask(PauseGeneration(mode), 60)

    async def resume(self) -> None:
        await self._ask(ContinueGeneration(), 60)

    async def expert_distribution(self, action: Literal["start", "stop", "dump"]) -> ControlReply:
        """Starts, stops or dumps the expert distribution recorder; a dump's reply carries the file's path."""
        return await self._ask(ExpertDistribution(action), 60)

    def stop_accepting(self, reason: str) -> None:
        """New requests get a 503 with `reason`; those in flight carry on."""
        self.unavailable = self.unavailable or reason

    def shutdown(self) -> None:
        self._stopping = True
        self.unavailable = self.unavailable or "The server is shutting down."
        if self.process.is_alive() and not self.dead:
            try:
                with self._send_lock:
                    self._conn.send_bytes(self._encode(Shutdown()))
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
