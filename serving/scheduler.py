"""Continuous batching: which requests run in the next forward, and what happens after it.

Every step runs one batch holding each running request's next token (decode)
plus as many waiting prompts as the token budget and the pool allow (prefill).
Admission reserves the slots a request may still need, so decode never runs
out of memory.
"""

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kiln.serving.kv_pool import KVPool
from kiln.serving.request import Req


@dataclass
class ScheduledBatch:
    reqs: list[Req]
    extends: list[list[int]]  # the token ids each request feeds this step

    @property
    def num_tokens(self) -> int:
        return sum(len(e) for e in self.extends)


class Scheduler:
    def __init__(
        self,
        pool: KVPool,
        max_running_requests: int,
        max_prefill_tokens: int,
        eos_ids: set[int],
        context_len: int,
        decode: Callable[[list[int]], str],
    ):
        self.pool = pool
        self.max_running = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = eos_ids
        self.context_len = context_len
        self.decode = decode
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        reqs = list(self.running)
        reserved = sum(r.remaining_tokens() for r in self.running)
        prefill_tokens = 0
        while self.waiting and len(reqs) < self.max_running:
            req = self.waiting[0]
            need = req.remaining_tokens()
            prompt = len(req.input_ids)
            if reserved + need > self.pool.free_slots:
                break
            if prefill_tokens and prefill_tokens + prompt > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            req.row = self.pool.alloc_row()
            self.running.append(req)
            reqs.append(req)
            reserved += need
            prefill_tokens += prompt
        if not reqs:
            return None
        extends = []
        for req in reqs:
            ids = req.next_extend()
            self.pool.alloc_slots(req.row, req.kv_len, len(ids))
            req.alloc_len = req.kv_len + len(ids)
            extends.append(ids)
        return ScheduledBatch(reqs, extends)

    def process(self, batch: ScheduledBatch, next_ids: list[int]) -> list[Req]:
        """Records each request's sampled token; returns the finished ones, already freed."""
        done = []
        for req, ids, tok in zip(batch.reqs, batch.extends, next_ids):
            req.kv_len += len(ids)
            if req.params.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
            else:
                req.output_ids.append(tok)
                req.check_finished(self.eos_ids, self.context_len, self.decode)
            if req.finished:
                self._release(req)
                done.append(req)
        return done

    def abort(self, rid: str) -> list[Req]:
        """Finishes matching requests (every request for rid == "") with an abort reason."""
        hit = [r for r in list(self.waiting) + self.running if not rid or r.rid == rid]
        for req in hit:
            req.finish_reason = {"type": "abort", "message": "Abort before prefill" if req.row < 0 else "Abort in decode"}
            if req in self.waiting:
                self.waiting.remove(req)
            else:
                self._release(req)
        return hit

    def _release(self, req: Req) -> None:
        self.running.remove(req)
        self.pool.free_slots_of(req.row, req.alloc_len)
        self.pool.free_row(req.row)
        req.row = -1
