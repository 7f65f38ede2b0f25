"""Who may start generating: requests hold a pass for their whole life; a weight update and a pause hold new ones back.

An update waits until every pass is returned (in-flight requests finish on the weights they started on)
and, while it waits or runs, no new pass is handed out, so no request sees two versions. A pause holds
new requests back until /continue_generation; an update during a pause runs at once, since the paused
requests keep their passes.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class GenerationGate:
    def __init__(self) -> None:
        self.active = 0  # passes out: requests between tokenization and their last output
        self.paused = False
        self._updating = 0  # updates waiting or running
        self._update_lock = asyncio.Lock()  # one update at a time
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    @asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Held by each generation request from before it reaches the engine until its last output."""
        await self._wait_until(lambda: not self.paused and not self._updating)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._notify()

    @asynccontextmanager
    async def update(self) -> AsyncIterator[None]:
        """Held by a weight update: waits for in-flight requests unless generation is paused."""
        self._updating += 1
        try:
            async with self._update_lock:
                await self._wait_until(lambda: self.paused or self.active == 0)
                yield
        finally:
            self._updating -= 1
            self._notify()

    def pause(self) -> None:
        self.paused = True
        self._notify()

    async def drained(self, timeout: float) -> bool:
        """Whether every pass came back within `timeout` seconds (after a pause that aborted the requests)."""
        try:
            await asyncio.wait_for(self._wait_until(lambda: self.active == 0), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def resume(self) -> None:
        self.paused = False
        self._notify()
