"""The HTTP process's handle on the engine process: start it, send requests, route outputs."""

import asyncio
import logging
import multiprocessing as mp
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from kiln.serving.engine_process import run_engine
from kiln.serving.messages import (
    AbortRequest,
    EngineError,
    FlushCache,
    FlushReply,
    FromEngine,
    GenerateRequest,
    InfoReply,
    InfoRequest,
    Shutdown,
    StepOutput,
    TokenOutput,
)
from kiln.serving.server_args import ServerArgs

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    pass


class EngineClient:
    """Starts the engine process; `generate` yields its TokenOutputs for one request."""

    def __init__(self, args: ServerArgs):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=run_engine, args=(args, child), daemon=True, name="kiln-engine")
        self.process.start()
        child.close()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(FromEngine).decode
        self._send_lock = threading.Lock()
        first = self._recv_blocking()
        if isinstance(first, EngineError) or first is None:
            raise EngineStartError(first.message if first else "engine process exited during start-up")
        self.info: dict[str, Any] = first.info
        self._queues: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._info_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self._flush_waiters: list[asyncio.Future[bool]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None

    def _recv_blocking(self) -> Any:
        try:
            return self._decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self._conn.send_bytes(self._encode(msg))

    def start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        """Routes engine output to the waiting coroutines of `loop` (call once, from that loop)."""
        self._loop = loop
        self._reader = threading.Thread(target=self._read_forever, daemon=True, name="kiln-engine-reader")
        self._reader.start()

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
        elif isinstance(msg, InfoReply):
            self.info = msg.info
            waiters, self._info_waiters = self._info_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(msg.info)
        elif isinstance(msg, FlushReply):
            waiters, self._flush_waiters = self._flush_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(msg.success)
        elif isinstance(msg, EngineError):
            log.error("engine: %s", msg.message)

    def _engine_died(self) -> None:
        if self._closing:
            return
        log.error("the engine process exited; failing %d requests", len(self._queues))
        for rid, queue in self._queues.items():
            queue.put_nowait(TokenOutput(rid, [], 0, 0, {"type": "abort", "message": "engine process exited"}))

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Yields outputs until the finishing one; leaving early aborts the request."""
        if req.rid in self._queues:
            raise ValueError(f"rid {req.rid!r} is already in use")
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._queues[req.rid] = queue
        finished = False
        try:
            if not self.alive:
                raise EngineStartError("the engine process is not running")
            self._send(req)
            while not finished:
                out = await queue.get()
                finished = out.finish_reason is not None
                yield out
        finally:
            del self._queues[req.rid]
            if not finished and self.alive:
                self._send(AbortRequest(req.rid))

    def abort(self, rid: str) -> None:
        self._send(AbortRequest(rid))

    async def refresh_info(self, timeout: float = 10.0) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._info_waiters.append(fut)
        self._send(InfoRequest())
        return await asyncio.wait_for(fut, timeout)

    async def flush_cache(self, timeout: float = 10.0) -> bool:
        """Empties the radix cache; False (and nothing flushed) while requests run or wait."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._flush_waiters.append(fut)
        self._send(FlushCache())
        return await asyncio.wait_for(fut, timeout)

    def shutdown(self) -> None:
        self._closing = True
        if self.alive:
            try:
                self._send(Shutdown())
            except OSError:
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
