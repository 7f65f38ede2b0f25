"""Continuous batching: which requests run in the next forward, and what happens after it.

Every step runs one batch: each running request's next token (decode), the
next chunk of prompts still prefilling, and as many waiting requests as the
token budget (the chunked-prefill size) and the pool allow. Admission reserves
room for the prompt and part of each request's remaining output; when decode
still runs short, the newest requests are retracted (their slots freed, their
tokens kept) and recomputed later. With the radix cache, admission reuses the
longest cached prefix, and finished requests leave their tokens in the cache.
"""

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.radix_cache import RadixCache
from kiln.serving.engine.request import Req
from kiln.serving.messages import FinishAbort, FinishLength, FinishReason


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
        cache: RadixCache | None,
        max_running_requests: int,
        chunk_size: int,
        policy: str,
        new_token_ratio: float,
        eos_ids: set[int],
        context_len: int,
        decode: Callable[[list[int]], str],
        split_prompts: bool = True,
    ):
        self.pool = pool
        self.cache = cache
        self.max_running = max_running_requests
        if 0 < chunk_size < 3:
            raise ValueError(f"--chunked-prefill-size must be at least 3 (or -1 to disable), got {chunk_size}: prompts are never split into lone tokens.")
        self.chunk_size = chunk_size if chunk_size > 0 else 1 << 30
        self.policy = policy
        self.new_token_ratio = new_token_ratio
        self.eos_ids = eos_ids
        self.context_len = context_len
        self.decode = decode
        # Pooled requests (embeddings, classifiers) need every token in one forward: never chunked.
        self.split_prompts = split_prompts
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.total_retractions = 0
        self.admitted_tokens = 0  # prompt tokens of requests admitted so far, and how many came from the cache
        self.admitted_cached_tokens = 0

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def available(self) -> int:
        """Slots that can be had now: free ones plus cached ones nobody holds."""
        return self.pool.free_slots + (self.cache.evictable_size() if self.cache else 0)

    def _future(self, req: Req) -> int:
        """Slots a request is expected to take from now on: all its uncomputed tokens, part of its output."""
        output_left = req.params.max_new_tokens - len(req.output_ids)
        return req.num_tokens - req.kv_len + math.ceil(output_left * self.new_token_ratio)

    def _plan_running(self) -> tuple[list[tuple[Req, int]], int]:
        """The running requests' tokens for the next step, and the budget they leave."""
        budget = self.chunk_size
        plan: list[tuple[Req, int]] = []
        for req in self.running:
            n = _chunk(req.num_tokens - req.kv_len, budget) if req.prefilling else 1
            if n > 0:
                plan.append((req, n))
                budget -= n
        return plan, budget

    def must_retract(self) -> bool:
        """Whether the next schedule() will retract a request for lack of room."""
        plan, _ = self._plan_running()
        return len(plan) > 1 and sum(n for _, n in plan) > self.available()

    def schedule(self) -> ScheduledBatch | None:
        plan, budget = self._plan_running()
        plan = self._retract_until_fits(plan)
        self._admit(plan, budget)
        if not plan:
            return None
        need = sum(n for _, n in plan)
        if self.cache and self.pool.free_slots < need:
            self.cache.evict(need - self.pool.free_slots, self.pool.free)
        extends = []
        for req, n in plan:
            ids = req.ids_between(req.kv_len, req.kv_len + n)
            self.pool.alloc_slots(req.row, req.kv_len, n)
            req.alloc_len = req.kv_len + n
            extends.append(ids)
        return ScheduledBatch([r for r, _ in plan], extends)

    def _retract_until_fits(self, plan: list[tuple[Req, int]]) -> list[tuple[Req, int]]:
        while plan and sum(n for _, n in plan) > self.available() and len(plan) > 1:
            req, _ = plan.pop()  # the newest admitted goes back first
            self._retract(req)
        return plan

    def _retract(self, req: Req) -> None:
        self._release(req)
        req.kv_len = req.alloc_len = 0
        req.retractions += 1
        self.total_retractions += 1
        self.waiting.appendleft(req)

    def _admit(self, plan: list[tuple[Req, int]], budget: int) -> None:
        if self.policy == "lpm" and self.cache and len(self.waiting) > 1:
            ranked = sorted(self.waiting, key=lambda r: -len(self.cache.match_prefix(r.all_ids[: r.max_prefix()])[0]))
            self.waiting = deque(ranked)
        reserved = sum(self._future(r) for r in self.running)
        prefilling: set[tuple[int, ...]] = set()  # prompts this step computes
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            req = self.waiting[0]
            if tuple(req.input_ids) in prefilling:
                break  # the same prompt is being computed now: take it from the cache next step
            prefix, node = self.cache.match_prefix(req.all_ids[: req.max_prefix()]) if self.cache else ([], None)
            if node is not None:
                self.cache.inc_lock(node)  # before measuring: locked slots are no longer evictable
            n = _chunk(req.num_tokens - len(prefix), budget)
            if n == 0 or not self.split_prompts and n < req.num_tokens - len(prefix):
                if node is not None:
                    self.cache.dec_lock(node)
                break
            req.kv_len = len(prefix)
            if reserved + self._future(req) > self.available():
                req.kv_len = 0
                if node is not None:
                    self.cache.dec_lock(node)
                break
            self.waiting.popleft()
            req.row = self.pool.alloc_row()
            req.prefix_len, req.prefix_node = len(prefix), node
            if len(prefix):
                self.pool.set_slots(req.row, 0, prefix)
            if not req.admitted:
                req.cached_tokens, req.admitted = len(prefix), True
                req.queue_time = time.monotonic() - req.arrival
                self.admitted_tokens += len(req.input_ids)
                self.admitted_cached_tokens += len(prefix)
            self.running.append(req)
            if self.cache and len(prefix) < len(req.input_ids) - 1:
                prefilling.add(tuple(req.input_ids))
            plan.append((req, n))
            reserved += self._future(req)
            budget -= n

    def process(self, batch: ScheduledBatch, next_ids: list[int]) -> list[Req]:
        """Records each request's sampled token; returns the finished ones, already released."""
        done = []
        for req, ids, tok in zip(batch.reqs, batch.extends, next_ids):
            if req.row < 0:
                continue  # ended during this step (`fail`): already released
            if self.advance(req, len(ids)) and self.record(req, tok):
                done.append(req)
        return done

    def advance(self, req: Req, n: int) -> bool:
        """Counts n more tokens of req as computed; True when the step samples a token for it.

        An overlapped step calls this when the step is launched: its K/V are then written before any later
        step reads them, since steps run in order."""
        req.kv_len += n
        if n > 1:
            # After each prefill chunk the computed prefix goes into the cache, so that a chunked
            # prompt and requests arriving with the same prompt (n > 1) reuse it from the next step.
            self._cache_progress(req)
        return req.kv_len >= req.num_tokens  # otherwise a chunk of a longer prefill: no token yet

    def record(self, req: Req, tok: int) -> bool:
        """Appends a sampled token and applies the finish rules; True when req finished (and is released)."""
        if req.params.max_new_tokens == 0:
            req.finish_reason = FinishLength(0)
        else:
            req.append_output(tok)
            req.check_finished(self.eos_ids, self.context_len, self.decode)
        if req.finished:
            self._release(req)
        return req.finished

    def abort(self, rid: str, message: str | None = None) -> list[Req]:
        """Finishes matching requests (every request for rid == "") with an abort reason."""
        hit = [r for r in list(self.waiting) + self.running if not rid or r.rid == rid]
        for req in hit:
            req.finish_reason = FinishAbort(message or ("Abort before prefill" if req.row < 0 else "Abort in decode"))
            if req in self.waiting:
                self.waiting.remove(req)
            else:
                self._release(req)
        return hit

    def fail(self, req: Req, reason: FinishReason) -> None:
        """Ends one request with `reason`, wherever it is (a finished one keeps its slots' release as done)."""
        if not req.finished or req in self.running:
            req.finish_reason = reason
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self._release(req)

    def retract_all(self) -> None:
        """Sends every running request back to the queue, its K/V freed (recomputed when it runs again)."""
        for req in reversed(list(self.running)):
            self._retract(req)

    def flush_cache(self) -> bool:
        """Empties the radix cache, only when no request runs or waits (as SGLang's /flush_cache)."""
        if self.has_work:
            return False
        self.reset_cache()
        return True

    def reset_cache(self) -> None:
        """Empties the radix cache; no request may be running (they lock the prefixes they use)."""
        if self.cache:
            self.cache.reset(self.pool.free)

    def _cache_progress(self, req: Req) -> None:
        """Puts the computed prefix in the cache between prefill chunks, and holds it from there."""
        if not self.cache:
            return
        self._insert(req)
        slots, node = self.cache.match_prefix(req.all_ids[: req.kv_len])
        self.cache.inc_lock(node)
        self.cache.dec_lock(req.prefix_node)
        self.pool.set_slots(req.row, 0, slots)
        req.prefix_len, req.prefix_node = len(slots), node

    def _insert(self, req: Req) -> None:
        """Hands the request's computed slots to the cache, freeing those it already had."""
        slots = self.pool.slots_of(req.row, 0, req.kv_len)
        cached = self.cache.insert(req.all_ids[: req.kv_len], slots)
        self.pool.free(slots[req.prefix_len : cached])

    def _release(self, req: Req) -> None:
        self.running.remove(req)
        if req.output_ids:
            # A finish found one step late (overlapped steps) comes after its last token was fed to the next
            # step: that K/V is dropped, so the cache holds what the synchronous path computes.
            req.kv_len = min(req.kv_len, req.num_tokens - 1)
        if self.cache:
            self._insert(req)
            self.cache.dec_lock(req.prefix_node)
            self.pool.free(self.pool.slots_of(req.row, req.kv_len, req.alloc_len))
        else:
            self.pool.free(self.pool.slots_of(req.row, 0, req.alloc_len))
        self.pool.free_row(req.row)
        req.row, req.prefix_len, req.prefix_node = -1, 0, None


def _chunk(left: int, budget: int) -> int:
    """Prompt tokens to compute this step: never a lone one while two or more are left, so every prompt
    position goes through the prefill attention kernels (see attention_torch.QUERY_BLOCK) and comes out
    the same whether its prefix was cached or not. 0 when the budget cannot take a valid chunk."""
    n = min(left, budget)
    if left - n == 1:
        n -= 1
    return n if n >= 2 or n == left else 0
