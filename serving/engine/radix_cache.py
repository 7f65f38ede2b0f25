"""A radix tree from token-id prefixes to the KV slots that already hold their K/V.

Page size is 1: every token owns exactly one slot, so a node's key and its
slot tensor always have the same length. The tree owns the slots stored in it;
a request that reads a cached prefix pins it with `inc_lock` for as long as it
uses those slots, and only unpinned leaves are evicted, least recently used
first.

Slot accounting, which the caller can check at any moment:
    pool free slots + evictable_size() + protected_size()
        + slots that requests allocated themselves and have not inserted
    == pool size
"""

import heapq
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

FreeFn = Callable[[Tensor], None]


def _empty_slots() -> Tensor:
    return torch.empty(0, dtype=torch.int64)


def _common_len(node_key: tuple[int, ...], key: tuple[int, ...], pos: int) -> int:
    """Length of the common prefix of node_key and key[pos:], without copying key."""
    n = min(len(node_key), len(key) - pos)
    i = 0
    while i < n and node_key[i] == key[pos + i]:
        i += 1
    return i


class RadixNode:
    __slots__ = ("key", "slots", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], slots: Tensor, parent: "RadixNode | None", last_access: int):
        self.key = key
        self.slots = slots  # int64 slot ids, slots[i] holds the K/V of key[i]
        self.children: dict[int, RadixNode] = {}  # keyed by the child's first token
        self.parent = parent
        self.lock_ref = 0  # requests whose locked node is this one or below it
        self.last_access = last_access

    def __repr__(self) -> str:
        return f"RadixNode(len={len(self.key)}, lock={self.lock_ref}, t={self.last_access}, kids={len(self.children)})"


class RadixCache:
    def __init__(self) -> None:
        # The root has no key and no slots; it is never locked or evicted, and
        # `reset` keeps it, so a request that matched nothing may hold it.
        self.root = RadixNode((), _empty_slots(), None, 0)
        self._clear()

    def _clear(self) -> None:
        """Forgets every node below the root without freeing anything."""
        self.root.children = {}
        # A counter, not wall time: ties and orderings stay reproducible in tests.
        self._clock = 0
        self.root.last_access = 0
        self._evictable = 0
        self._protected = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # -- lookups -----------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> tuple[Tensor, RadixNode]:
        """Slots of the longest cached prefix of token_ids, and the node where it ends.

        When the match ends inside a node the node is split there, so the
        returned node covers the matched prefix exactly and can be locked
        without pinning tokens the caller does not use. The slots stay valid
        only until the next `evict`: lock the node before allocating.
        """
        key = tuple(token_ids)
        now = self._tick()
        node, pos, parts = self.root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            k = _common_len(child.key, key, pos)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = now
            parts.append(child.slots)
            pos += k
            node = child
        self.root.last_access = now
        return (torch.cat(parts) if parts else _empty_slots()), node

    def insert(self, token_ids: Sequence[int], slots: Tensor) -> int:
        """Caches slots[i] as the K/V of token_ids[i]; returns how many leading tokens were cached already.

        Contract: the tree keeps its own slots for those first `n` tokens and
        ignores slots[:n]. The caller must free every slot of slots[:n] that it
        allocated itself (those not obtained from `match_prefix`): they now
        duplicate K/V the tree holds. slots[n:] belong to the tree afterwards;
        they are unlocked, so the caller must not use them past this call
        unless it re-matches and locks them.
        """
        key = tuple(token_ids)
        if len(slots) != len(key):
            raise ValueError(f"{len(key)} tokens but {len(slots)} slots")
        now = self._tick()
        node, pos = self.root, 0
        node.last_access = now
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                leaf = RadixNode(key[pos:], slots[pos:].to(device="cpu", dtype=torch.int64, copy=True), node, now)
                node.children[key[pos]] = leaf
                self._evictable += len(leaf.key)
                return pos
            k = _common_len(child.key, key, pos)
            if k < len(child.key):
                child = self._split(child, k)
            child.last_access = now
            pos += k
            node = child
        return pos

    def _split(self, child: RadixNode, k: int) -> RadixNode:
        """Cuts child after its first k tokens; returns the new upper node.

        The original node keeps the tail, so any request holding it as its
        locked node still holds the deepest node of its path; the upper node
        carries the same lock count, since every lock through child passes it.
        """
        parent = child.parent
        if parent is None or not 0 < k < len(child.key):
            raise RuntimeError(f"cannot split a detached node or at {k} of {len(child.key)}")
        upper = RadixNode(child.key[:k], child.slots[:k], parent, child.last_access)
        upper.lock_ref = child.lock_ref
        upper.children[child.key[k]] = child
        child.key, child.slots, child.parent = child.key[k:], child.slots[k:], upper
        parent.children[upper.key[0]] = upper
        return upper

    # -- pinning -----------------------------------------------------------

    def _path(self, node: RadixNode) -> list[RadixNode]:
        """node and its ancestors below the root; checked whole first so a bad call changes no count."""
        path = []
        while node is not self.root:
            if node.parent is None:
                raise RuntimeError("node is no longer in the tree (evicted or reset)")
            path.append(node)
            node = node.parent
        return path

    def inc_lock(self, node: RadixNode) -> None:
        """Pins node and its ancestors: their slots stay valid until `dec_lock(node)`."""
        for n in self._path(node):
            if n.lock_ref == 0:
                self._evictable -= len(n.key)
                self._protected += len(n.key)
            n.lock_ref += 1

    def dec_lock(self, node: RadixNode) -> None:
        path = self._path(node)
        if any(n.lock_ref <= 0 for n in path):
            raise RuntimeError("dec_lock without a matching inc_lock")
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._protected -= len(n.key)
                self._evictable += len(n.key)

    # -- freeing -----------------------------------------------------------

    def evict(self, num_tokens: int, free_fn: FreeFn) -> int:
        """Drops unlocked leaves, oldest access first, until num_tokens slots are freed; returns the count.

        free_fn receives each evicted node's slots. Frees fewer than asked only
        when nothing evictable is left.
        """
        order = 0  # breaks last_access ties by discovery order, never by comparing nodes
        heap: list[tuple[int, int, RadixNode]] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root and not node.children and node.lock_ref == 0:
                heap.append((node.last_access, order, node))
                order += 1
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            if parent is None:
                raise RuntimeError("an evictable node lost its parent")
            free_fn(node.slots)
            del parent.children[node.key[0]]
            node.parent = None  # a stale handle now fails loudly in inc_lock/dec_lock
            freed += len(node.key)
            self._evictable -= len(node.key)
            # Ancestors of an unlocked node may still be locked by other requests.
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, order, parent))
                order += 1
        return freed

    def reset(self, free_fn: FreeFn | None = None) -> Tensor:
        """Empties the tree (for /flush_cache); returns every slot it held, also passed to free_fn if given.

        Refuses while any node is locked: those slots are in use by running requests.
        """
        if self._protected:
            raise RuntimeError(f"cannot reset: {self._protected} cached tokens are locked by running requests")
        parts, stack = [], list(self.root.children.values())
        for top in stack:
            top.parent = None  # cuts stale handles off, as eviction does
        while stack:
            node = stack.pop()
            parts.append(node.slots)
            stack.extend(node.children.values())
        slots = torch.cat(parts) if parts else _empty_slots()
        self._clear()
        if free_fn is not None and len(slots):
            free_fn(slots)
        return slots

    # -- sizes -------------------------------------------------------------

    def evictable_size(self) -> int:
        """Cached tokens no request has locked."""
        return self._evictable

    def protected_size(self) -> int:
        """Cached tokens some running request has locked."""
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected
