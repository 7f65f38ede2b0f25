"""The radix prefix cache on its own: lookups, splits, locks, LRU eviction, and a stateful model check."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import Tensor

from kiln.serving.engine.radix_cache import RadixCache, RadixNode


def t(*xs: int) -> Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def evict_all(cache: RadixCache, n: int) -> tuple[int, list[list[int]]]:
    """Evicts n tokens; returns the count and each free_fn call's slots, in call order."""
    calls: list[list[int]] = []
    freed = cache.evict(n, lambda s: calls.append(s.tolist()))
    return freed, calls


# -- unit tests --------------------------------------------------------------


def test_match_on_empty_cache():
    cache = RadixCache()
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.dtype == torch.int64 and slots.tolist() == []
    assert node is cache.root
    assert cache.match_prefix([])[1] is cache.root
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (0, 0, 0)


def test_insert_then_match_full_partial_diverging():
    cache = RadixCache()
    assert cache.insert([1, 2, 3, 4], t(10, 11, 12, 13)) == 0
    full, leaf = cache.match_prefix([1, 2, 3, 4])
    assert full.tolist() == [10, 11, 12, 13] and leaf.key == (1, 2, 3, 4)
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0].tolist() == [10, 11, 12, 13]  # longer query
    assert cache.match_prefix([1, 2])[0].tolist() == [10, 11]  # partial
    assert cache.match_prefix([1, 2, 9, 9])[0].tolist() == [10, 11]  # diverging
    slots, node = cache.match_prefix([5, 1])
    assert slots.tolist() == [] and node is cache.root
    assert cache.total_size() == 4 == cache.evictable_size()


def test_node_split_keeps_slot_order():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4, 5, 6], t(11, 12, 13, 14, 15, 16))
    slots, upper = cache.match_prefix([1, 2, 3, 9])  # ends inside the node: split after 3 tokens
    assert slots.tolist() == [11, 12, 13]
    assert upper.key == (1, 2, 3) and upper.slots.tolist() == [11, 12, 13]
    (lower,) = upper.children.values()
    assert lower.key == (4, 5, 6) and lower.slots.tolist() == [14, 15, 16] and lower.parent is upper
    assert cache.root.children[1] is upper
    assert cache.insert([1, 2, 3, 7, 8], t(91, 92, 93, 27, 28)) == 3
    assert cache.match_prefix([1, 2, 3, 4, 5, 6])[0].tolist() == [11, 12, 13, 14, 15, 16]
    assert cache.match_prefix([1, 2, 3, 7, 8])[0].tolist() == [11, 12, 13, 27, 28]
    assert cache.total_size() == 8


def test_insert_returns_duplicate_prefix_length():
    cache = RadixCache()
    assert cache.insert([1, 2, 3], t(1, 2, 3)) == 0
    assert cache.insert([1, 2, 3, 4], t(5, 6, 7, 8)) == 3  # caller frees 5, 6, 7
    assert cache.insert([1, 2], t(9, 10)) == 2  # wholly cached, splits nothing it does not need
    assert cache.insert([1, 2, 3], t(9, 10, 11)) == 3
    assert cache.total_size() == 4
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == [1, 2, 3, 8]
    with pytest.raises(ValueError):
        cache.insert([1, 2], t(1))


def test_lru_eviction_order():
    cache = RadixCache()
    cache.insert([1, 1], t(1, 2))
    cache.insert([2, 2], t(3, 4))
    cache.insert([3, 3], t(5, 6))
    cache.match_prefix([1, 1, 5])  # a use of all of (1, 1): now the newest
    assert evict_all(cache, 1) == (2, [[3, 4]])  # whole nodes only, so 2 for 1 asked
    assert evict_all(cache, 3) == (4, [[5, 6], [1, 2]])
    assert cache.total_size() == 0 and evict_all(cache, 1) == (0, [])


def test_a_partial_match_refreshes_only_the_matched_part():
    cache = RadixCache()
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([5], t(5))
    cache.match_prefix([1, 9])  # splits (1, 2, 3); the tail (2, 3) keeps its old access time
    assert evict_all(cache, 1) == (2, [[2, 3]])
    assert evict_all(cache, 1) == (1, [[5]])


def test_parent_becomes_candidate_when_its_last_child_goes():
    cache = RadixCache()
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([1, 2, 4], t(1, 2, 4))  # splits: (1, 2) -> (3), (4); slot 4 is the duplicate-free one
    cache.insert([7], t(7))
    cache.match_prefix([1, 2, 4])  # newest: the whole (1, 2, 4) path
    freed, calls = evict_all(cache, 100)
    assert freed == 5
    # (3) is the oldest leaf; (7) is older than (1,2) and (4), which were touched last.
    assert calls == [[3], [7], [4], [1, 2]]


def test_locked_nodes_survive_eviction():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], t(1, 2, 3, 4))
    cache.insert([1, 2, 5, 6], t(1, 2, 5, 6))
    cache.insert([9], t(9))
    slots, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock(node)
    assert (cache.protected_size(), cache.evictable_size()) == (4, 3)
    freed, calls = evict_all(cache, 100)
    assert freed == 3 and sorted(sum(calls, [])) == [5, 6, 9]
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == [1, 2, 3, 4]
    assert (cache.protected_size(), cache.evictable_size()) == (4, 0)
    cache.dec_lock(node)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 4)
    with pytest.raises(RuntimeError):
        cache.dec_lock(node)  # one more than was locked
    assert evict_all(cache, 100) == (4, [[3, 4], [1, 2]])
    with pytest.raises(RuntimeError):
        cache.inc_lock(node)  # evicted


def test_lock_survives_a_later_split():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], t(1, 2, 3, 4))
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock(node)
    _, upper = cache.match_prefix([1, 2])  # splits the locked node
    assert upper.lock_ref == 1 and node.parent is upper and node.lock_ref == 1
    assert cache.protected_size() == 4 and evict_all(cache, 100) == (0, [])
    cache.dec_lock(node)
    assert upper.lock_ref == node.lock_ref == 0 and cache.evictable_size() == 4


def test_evicting_a_whole_branch_frees_exactly_its_slots():
    cache = RadixCache()
    branch = {
        (1, 2, 3): t(11, 12, 13),
        (1, 2, 4, 5): t(11, 12, 14, 15),
        (1, 2, 4, 6): t(11, 12, 14, 16),
    }
    for ids, slots in branch.items():
        cache.insert(ids, slots)
    cache.insert([7, 8], t(17, 18))  # newest: survives
    freed, calls = evict_all(cache, 6)
    assert freed == 6
    flat = sum(calls, [])
    assert sorted(flat) == [11, 12, 13, 14, 15, 16] and len(flat) == len(set(flat))
    assert list(cache.root.children) == [7] and cache.total_size() == 2


def test_reset_returns_every_slot_and_refuses_while_locked():
    cache = RadixCache()
    cache.insert([1, 2, 3], t(1, 2, 3))
    cache.insert([1, 5], t(1, 5))
    _, node = cache.match_prefix([1, 5])
    cache.inc_lock(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.dec_lock(node)
    got: list[Tensor] = []
    slots = cache.reset(got.append)
    assert sorted(slots.tolist()) == [1, 2, 3, 5] and sorted(got[0].tolist()) == [1, 2, 3, 5]
    assert cache.total_size() == 0 and not cache.root.children
    assert cache.reset().tolist() == []
    with pytest.raises(RuntimeError):  # a handle from before the reset
        cache.inc_lock(node)
    assert cache.protected_size() == 0


# -- stateful model check ------------------------------------------------------

N = 24  # slots 1..N; slot 0 is the pool's scratch slot and must never appear
token_lists = st.lists(st.integers(0, 2), min_size=1, max_size=8)  # a tiny alphabet makes prefixes collide


class SlotPool:
    """The KV pool reduced to its free set, asserting no slot is handed out or freed twice."""

    def __init__(self, n: int):
        self.n = n
        self.free = set(range(1, n + 1))

    def alloc(self, k: int) -> Tensor:
        assert k <= len(self.free)
        got = sorted(self.free)[:k]
        self.free.difference_update(got)
        return torch.tensor(got, dtype=torch.int64)

    def release(self, slots: Tensor) -> None:
        for s in slots.tolist():
            assert 1 <= s <= self.n, f"slot {s} is not a pool slot"
            assert s not in self.free, f"slot {s} freed twice"
            self.free.add(s)


@dataclass
class Flight:
    """An in-flight request: slots[:matched] are the tree's (locked), slots[matched:] its own."""

    ids: list[int]
    slots: Tensor
    node: RadixNode
    matched: int


class RadixCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = RadixCache()
        self.root = self.cache.root
        self.pool = SlotPool(N)
        self.model: dict[tuple[int, ...], int] = {}  # every cached prefix -> the slot of its last token
        self.flights: list[Flight] = []

    def _expected(self, ids: list[int]) -> list[int]:
        out = []
        while len(out) < len(ids) and tuple(ids[: len(out) + 1]) in self.model:
            out.append(self.model[tuple(ids[: len(out) + 1])])
        return out

    def _on_evict(self, slots: Tensor) -> None:
        self.pool.release(slots)
        gone = set(slots.tolist())
        self.model = {k: v for k, v in self.model.items() if v not in gone}

    def _evict_checked(self, k: int) -> None:
        """Evicts k tokens, checking the amount freed and that it went least recently used first."""
        before = self.cache.evictable_size()
        # A node's first slot names it in free_fn's calls; remember each node's access time now.
        stamp = {int(n.slots[0]): n.last_access for n in self._nodes()}
        calls: list[Tensor] = []
        freed = self.cache.evict(k, lambda s: (calls.append(s), self._on_evict(s)))
        assert freed == sum(len(c) for c in calls) <= before
        assert freed >= min(k, before)
        assert not calls or freed - len(calls[-1]) < k, "evicted past the amount asked for"
        times = [stamp[int(c[0])] for c in calls]
        assert times == sorted(times), "eviction not in last-access order"
        left = [n.last_access for n in self._nodes() if not n.children and not n.lock_ref]
        assert not times or not left or max(times) <= min(left), "a more recently used leaf went first"

    def _nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.cache.root.children.values())
        while stack:
            out.append(stack.pop())
            stack.extend(out[-1].children.values())
        return out

    def _make_room(self, need: int) -> bool:
        short = need - len(self.pool.free)
        if short > 0:
            self._evict_checked(short)
        return need <= len(self.pool.free)

    @rule(ids=token_lists)
    def new_request(self, ids: list[int]) -> None:
        self._admit(ids)

    @precondition(lambda self: self.flights)
    @rule(data=st.data(), tail=st.lists(st.integers(0, 2), max_size=3))
    def request_sharing_a_prefix(self, data: st.DataObject, tail: list[int]) -> None:
        """Reuses part of an in-flight request's ids: matches that end inside locked nodes."""
        f = data.draw(st.sampled_from(self.flights))
        ids = f.ids[: data.draw(st.integers(0, len(f.ids)))] + tail
        if ids:
            self._admit(ids)

    def _admit(self, ids: list[int]) -> None:
        """Match, lock, allocate the rest; gives up (unlocking) when even eviction leaves too few slots."""
        slots, node = self.cache.match_prefix(ids)
        assert slots.tolist() == self._expected(ids)
        self.cache.inc_lock(node)
        need = len(ids) - len(slots)
        if not self._make_room(need):
            self.cache.dec_lock(node)
            return
        self.flights.append(Flight(list(ids), torch.cat([slots, self.pool.alloc(need)]), node, len(slots)))

    def _finish(self, f: Flight) -> None:
        full = tuple(f.ids)
        already = len(self._expected(f.ids))
        dup = self.cache.insert(full, f.slots)
        assert dup == already and dup >= f.matched
        self.pool.release(f.slots[f.matched : dup])  # the contract: free our own duplicate slots
        for j in range(dup, len(full)):
            self.model[full[: j + 1]] = int(f.slots[j])
        self.cache.dec_lock(f.node)
        got, _ = self.cache.match_prefix(full)
        assert got.tolist() == [self.model[full[: j + 1]] for j in range(len(full))]
        assert torch.equal(got[dup:], f.slots[dup:])

    @precondition(lambda self: self.flights)
    @rule(data=st.data(), output=st.lists(st.integers(0, 2), max_size=4))
    def finish_request(self, data: st.DataObject, output: list[int]) -> None:
        """Decodes `output` (when slots allow), then caches prompt + output and unlocks."""
        f = self.flights.pop(data.draw(st.integers(0, len(self.flights) - 1)))
        if output and self._make_room(len(output)):
            f.slots = torch.cat([f.slots, self.pool.alloc(len(output))])
            f.ids = f.ids + output
        self._finish(f)

    @precondition(lambda self: self.flights)
    @rule(data=st.data())
    def abort_request(self, data: st.DataObject) -> None:
        f = self.flights.pop(data.draw(st.integers(0, len(self.flights) - 1)))
        self.pool.release(f.slots[f.matched :])
        self.cache.dec_lock(f.node)

    # drain and reset wipe out the state the other rules build up, so each
    # fires on only one draw in four; otherwise locked splits barely happen.
    @rule(go=st.integers(0, 3))
    def drain(self, go: int) -> None:
        if go != 3:
            return
        while self.flights:
            self._finish(self.flights.pop())
        self._check_tree()
        assert self.cache.protected_size() == 0

    @rule(ids=token_lists)
    def lookup(self, ids: list[int]) -> None:
        assert self.cache.match_prefix(ids)[0].tolist() == self._expected(ids)

    @rule(k=st.integers(0, N + 2))
    def evict(self, k: int) -> None:
        self._evict_checked(k)

    @rule(go=st.integers(0, 3))
    def reset(self, go: int) -> None:
        if go != 3:
            return
        if self.cache.protected_size():
            with pytest.raises(RuntimeError):
                self.cache.reset()
            return
        slots = self.cache.reset(self.pool.release)
        assert sorted(slots.tolist()) == sorted(self.model.values())
        self.model.clear()

    def _check_tree(self) -> dict[tuple[int, ...], int]:
        """Walks the tree checking its shape and lock counts; returns prefix -> slot."""
        cache, root = self.cache, self.cache.root
        assert root is self.root and root.key == () and root.parent is None and root.lock_ref == 0
        locks: dict[int, int] = {}  # id(node) -> flights whose path runs through it
        for f in self.flights:
            n = f.node
            while n is not root:
                locks[id(n)] = locks.get(id(n), 0) + 1
                assert n.parent is not None, "a locked node was evicted"
                n = n.parent
        found: dict[tuple[int, ...], int] = {}
        evictable = protected = 0
        stack: list[tuple[RadixNode, tuple[int, ...]]] = [(root, ())]
        while stack:
            node, prefix = stack.pop()
            for first, child in node.children.items():
                assert child.key and child.key[0] == first and child.parent is node
                assert len(child.key) == len(child.slots)
                assert child.lock_ref == locks.get(id(child), 0)
                assert child.last_access <= node.last_access or node is root
                if child.lock_ref:
                    protected += len(child.key)
                else:
                    evictable += len(child.key)
                path = prefix
                for tok, slot in zip(child.key, child.slots.tolist()):
                    path = path + (tok,)
                    found[path] = slot
                stack.append((child, path))
        assert (evictable, protected) == (cache.evictable_size(), cache.protected_size())
        assert cache.total_size() == len(found)
        return found

    @invariant()
    def tree_matches_model_and_slots_are_conserved(self) -> None:
        found = self._check_tree()
        assert found == self.model
        for f in self.flights:  # a request's locked prefix still holds the slots it read
            assert f.slots[: f.matched].tolist() == self._expected(f.ids)[: f.matched]
        own = [s for f in self.flights for s in f.slots[f.matched :].tolist()]
        everywhere = sorted(self.pool.free) + list(found.values()) + own
        assert sorted(everywhere) == list(range(1, N + 1)), "a slot is lost or in two places"
        c = self.cache
        assert len(self.pool.free) + c.evictable_size() + c.protected_size() + len(own) == N


RadixCacheMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_radix_cache_state_machine = RadixCacheMachine.TestCase
