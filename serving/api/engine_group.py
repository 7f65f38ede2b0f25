"""The HTTP process's engines: `--dp-size` engine processes behind the one interface the app uses."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Literal, TypeVar

from kiln.serving.api.dp_router import PrefixRouter
from kiln.serving.api.engine_client import EngineClient, EngineStartError, EngineUnavailable
from kiln.serving.messages import CheckpointLocated, ControlReply, EngineInfo, EngineStats, GenerateRequest, PauseMode, TokenOutput
from kiln.serving.sampling_params import InvalidRequest
from kiln.serving.server_args import ServerArgs

T = TypeVar("T")


def _first_failure(replies: list[ControlReply]) -> ControlReply:
    return next((r for r in replies if not r.success), replies[0])


class EngineGroup:
    """Starts every engine at once; routes each prompt to one engine and sends control messages to all.

    Each prompt goes where the router says (dp_router.PrefixRouter; by load alone with --load-balance-method
    shortest_queue), every sample of it with it, and the group remembers which engine holds each request id
    until its request closes: outputs, aborts and the duplicate-id check follow that. Flushes, pauses, weight updates and expert recording reach every engine.
    With one engine nothing is routed. When any engine dies, the requests in flight on the others end with
    the same 503 and `on_death` is called (the server exits).
    """

    @classmethod
    def start(cls, args: ServerArgs, while_loading: Callable[[Callable[[], CheckpointLocated]], None] | None = None) -> "EngineGroup":
        """Starts `--dp-size` engine processes together and returns once all are ready (EngineStartError if one is not).
        `while_loading` runs as soon as they are spawned, while they import, load and compile; it is given a call
        that waits until the first engine has found its checkpoint."""
        engines = [EngineClient(args, rank) for rank in range(args.dp_size)]
        try:
            if while_loading is not None:
                while_loading(engines[0].wait_located)
            for engine in engines:
                engine.wait_ready()
        except EngineStartError:
            for engine in engines:
                engine.shutdown()
            raise
        return cls(args, engines)

    def __init__(self, args: ServerArgs, engines: list[EngineClient]):
        self.engines = engines
        self.info: EngineInfo = engines[0].info
        self.router = PrefixRouter(len(self.engines), self.info.limits.max_total_tokens)
        self._by_prefix = args.load_balance_method == "cache_aware"
        self._owner: dict[str, EngineClient] = {}
        self.on_death: Callable[[], None] | None = None
        self._died = False
        for engine in self.engines:
            engine.on_death = self._engine_died

    # ---- requests ----

    def open(self, rids: list[str], prompts: list[list[int]]) -> list[asyncio.Queue[TokenOutput]]:
        """Routes and registers the requests about to be sent; refuses the lot if an id is already in flight."""
        if self.unavailable is not None:
            raise EngineUnavailable(self.unavailable)
        if len(set(rids)) != len(rids):
            dupes = sorted({r for r in rids if rids.count(r) > 1})
            raise InvalidRequest(f"Duplicate request IDs detected within the request: {dupes}")
        for rid in rids:
            if rid in self._owner:
                raise InvalidRequest(f"Duplicate request ID detected: {rid}")
        targets = self._route(prompts) if len(self.engines) > 1 else [0] * len(rids)
        queues = []
        for rid, target in zip(rids, targets):
            engine = self.engines[target]
            self._owner[rid] = engine
            queues.append(engine.open(rid))
        return queues

    def _route(self, prompts: list[list[int]]) -> list[int]:
        """An engine per prompt; the same prompt twice (the n samples of one) goes to the same engine."""
        loads = [engine.num_in_flight for engine in self.engines]
        chosen: dict[tuple[int, ...], int] = {}
        targets = []
        for ids in prompts:
            key = tuple(ids)
            if key not in chosen:
                blocks = self.router.block_keys(ids) if self._by_prefix else []  # no blocks: the least loaded
                chosen[key] = self.router.route(blocks, loads)
                self.router.record(chosen[key], blocks)
            loads[chosen[key]] += 1
            targets.append(chosen[key])
        return targets

    def close(self, rids: list[str], queues: list[asyncio.Queue[TokenOutput]]) -> None:
        """Forgets the opened ids (their requests ended or were never sent)."""
        for rid, queue in zip(rids, queues):
            engine = self._owner.pop(rid, None)
            if engine is not None:
                engine.close(rid, queue)

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Sends an opened request to its engine and yields its outputs (see EngineClient.generate)."""
        return self._owner[req.rid].generate(req)

    def abort(self, rid: str, message: str | None = None) -> None:
        """Aborts a request and its n copies on the engine holding them, or every request for rid ""."""
        for engine in self.engines:
            engine.abort(rid, message)

    @property
    def num_in_flight(self) -> int:
        return sum(engine.num_in_flight for engine in self.engines)

    # ---- every engine ----

    @staticmethod
    async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*calls))

    async def stats(self, timeout: float = 10.0) -> list[EngineStats]:
        """Each engine's figures, by dp rank."""
        return await self._all(engine.stats(timeout) for engine in self.engines)

    async def flush_cache(self, timeout: float = 10.0) -> bool:
        """Empties every engine's radix cache; False if any refused (it had requests running or waiting)."""
        flushed = await self._all(engine.flush_cache(timeout) for engine in self.engines)
        for rank, ok in enumerate(flushed):
            if ok:
                self.router.forget(rank)
        return all(flushed)

    async def update_weights(self, model_path: str, load_format: str | None, flush_cache: bool) -> ControlReply:
        replies = await self._all(engine.update_weights(model_path, load_format, flush_cache) for engine in self.engines)
        for rank, reply in enumerate(replies):
            if reply.success and flush_cache:
                self.router.forget(rank)
        return _first_failure(replies)

    async def pause(self, mode: PauseMode) -> None:
        await self._all(engine.pause(mode) for engine in self.engines)

    async def resume(self) -> None:
        await self._all(engine.resume() for engine in self.engines)

    async def expert_distribution(self, action: Literal["start", "stop", "dump"]) -> ControlReply:
        return _first_failure(await self._all(engine.expert_distribution(action) for engine in self.engines))

    # ---- lifecycle ----

    def start_reader(self, loop: asyncio.AbstractEventLoop) -> None:
        for engine in self.engines:
            engine.start_reader(loop)

    @property
    def unavailable(self) -> str | None:
        return next((engine.unavailable for engine in self.engines if engine.unavailable is not None), None)

    @property
    def dead(self) -> bool:
        return any(engine.dead for engine in self.engines)

    @property
    def alive(self) -> bool:
        return all(engine.alive for engine in self.engines)

    def _engine_died(self) -> None:
        if self._died:  # a second engine's death changes nothing more
            return
        self._died = True
        gone = next(engine for engine in self.engines if engine.dead)
        for engine in self.engines:
            if not engine.dead:
                engine.stop_accepting(f"The {gone.name} exited; the server is shutting down.")
                engine.fail_in_flight(f"The {gone.name} exited.")
        if self.on_death is not None:
            self.on_death()

    def stop_accepting(self, reason: str) -> None:
        for engine in self.engines:
            engine.stop_accepting(reason)

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()
