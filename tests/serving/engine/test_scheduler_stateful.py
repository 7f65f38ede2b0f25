"""A hypothesis state machine over the scheduler with the real slot pool and radix cache.

Random arrivals (with shared prefixes), steps with random sampled tokens, and aborts; after every rule
each slot is in exactly one place (free list, radix tree, or a running request's own range), no lock
outlives its request, and no prompt token is computed alone.
"""

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kiln.serving.engine.kv_pool import KVPool
from kiln.serving.engine.radix_cache import RadixCache
from kiln.serving.engine.request import Req
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.engine.scheduler import Scheduler

SLOTS = 40


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        pool = KVPool(SLOTS, 1, 1, 2, torch.float32, torch.device("cpu"), 4, 64)
        self.s = Scheduler(pool, RadixCache(), 4, chunk_size=6, policy="fcfs", new_token_ratio=0.3, eos_ids={0}, context_len=64, decode=lambda ids: "")
        self.n = 0

    @rule(prompt=st.lists(st.integers(1, 3), min_size=1, max_size=10), new=st.integers(1, 6))
    def arrive(self, prompt, new):
        self.s.add(Req(f"r{self.n}", prompt, SamplingParams(max_new_tokens=new, ignore_eos=True), seed=0))
        self.n += 1

    @rule(tokens=st.lists(st.integers(1, 3), min_size=8, max_size=8))
    def step(self, tokens):
        batch = self.s.schedule()
        if batch is not None:
            for req, ids in zip(batch.reqs, batch.extends):
                # Prompt tokens come two or more at a time, never leaving a lone one (see scheduler._chunk).
                left = req.num_tokens - req.kv_len
                assert len(ids) == left == 1 or len(ids) >= 2 and left - len(ids) != 1, (len(ids), left)
            self.s.process(batch, (tokens * 8)[: len(batch.reqs)])

    @rule(data=st.data())
    def abort_one(self, data):
        live = [r.rid for r in list(self.s.waiting) + self.s.running]
        if live:
            self.s.abort(data.draw(st.sampled_from(live)))

    @rule()
    def flush(self):
        busy = self.s.has_work
        assert self.s.flush_cache() is not busy

    @invariant()
    def every_slot_in_one_place(self):
        pool, cache = self.s.pool, self.s.cache
        free = pool._free_slots.tolist()
        tree, stack = [], [cache.root]
        while stack:
            node = stack.pop()
            tree += node.slots.tolist()
            stack.extend(node.children.values())
        own = []
        for r in self.s.running:
            own += pool.slots_of(r.row, r.prefix_len, r.alloc_len).tolist()
            assert pool.slots_of(r.row, 0, r.prefix_len).tolist() == cache.match_prefix(r.all_ids[: r.prefix_len])[0].tolist()
        everywhere = free + tree + own
        assert sorted(everywhere) == list(range(1, SLOTS + 1)), "a slot leaked, or sits in two places"
        assert len(free) + cache.evictable_size() + cache.protected_size() + len(own) == SLOTS

    @invariant()
    def locks_follow_requests(self):
        if not self.s.running:
            assert self.s.cache.protected_size() == 0 and self.s.cache.root.lock_ref == 0


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
