"""The HTTP server around the app: uvicorn with read timeouts, a draining shutdown, and an exit when an engine dies."""

import asyncio
import logging
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from kiln.serving.api.engine_group import EngineGroup

log = logging.getLogger("kiln")

SHUTDOWN_MESSAGE = "The server is shutting down."
# After the drain timeout, how long the aborted requests get to send their last chunk.
ABORT_FLUSH_S = 5.0


class TimedH11Protocol(H11Protocol):
    """Disconnects a client that stalls while sending a request.

    The head must arrive within `read_timeout` seconds of the connection's first wait (no reset on
    trickled bytes), and a body may pause at most `read_timeout` between chunks. uvicorn itself only
    times out idle keep-alive connections after a response, so a half-open connection would stay forever.
    """

    read_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._watch(progress=False)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(progress=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def _watch(self, progress: bool) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY and progress or state not in (h11.IDLE, h11.SEND_BODY):
            self._cancel_read_timer()  # a body chunk came, or the request is whole: the app's turn
        if state in (h11.IDLE, h11.SEND_BODY) and self._read_timer is None:
            self._read_timer = self.loop.call_later(self.read_timeout, self._stalled)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _stalled(self) -> None:
        self._read_timer = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request within %.0fs", self.client, self.read_timeout)
            self.transport.close()


def protocol_with_timeout(read_timeout: float) -> type[H11Protocol]:
    return type("KilnH11Protocol", (TimedH11Protocol,), {"read_timeout": read_timeout})


class KilnServer(uvicorn.Server):
    """On SIGTERM: stop accepting, let requests in flight finish for up to `drain_timeout` seconds, abort
    the rest (they end with an abort finish reason), then stop. When an engine dies: stop at once."""

    def __init__(self, config: uvicorn.Config, engine: EngineGroup, drain_timeout: float):
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        engine.on_death = self._engine_died

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises every captured signal once serving ends, so the default SIGTERM handler would
        # kill the process (exit -15) before `kiln serve` returns: a drained shutdown exits 0 instead.
        self._captured_signals.clear()

    def _engine_died(self) -> None:
        log.error("the engine process is gone: exiting so that a supervisor can restart the server")
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        engine = self.engine
        engine.stop_accepting(SHUTDOWN_MESSAGE)
        loop = asyncio.get_running_loop()
        if engine.num_in_flight and not engine.dead:
            log.info("draining %d requests in flight (up to %.0fs)", engine.num_in_flight, self.drain_timeout)
            await self._wait_idle(loop.time() + self.drain_timeout)
        if engine.num_in_flight and not engine.dead:
            log.warning("aborting %d requests still in flight after %.0fs", engine.num_in_flight, self.drain_timeout)
            engine.abort("", SHUTDOWN_MESSAGE)
            await self._wait_idle(loop.time() + ABORT_FLUSH_S)
        await super().shutdown(sockets)

    async def _wait_idle(self, deadline: float) -> None:
        while self.engine.num_in_flight and not self.engine.dead and asyncio.get_running_loop().time() < deadline and not self.force_exit:
            await asyncio.sleep(0.1)
