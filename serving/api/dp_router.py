"""Which data-parallel engine gets a prompt: the one that saw its longest prefix, else the least loaded.

The HTTP process cannot see the engines' radix caches, so it keeps an approximate index of its own: the
prompts it sent to each engine, cut into blocks of `block_size` tokens and hashed as a chain (a block's
key covers every token before it too), so that one dict lookup per block says whether an engine was sent
that whole prefix. Each engine's index holds at most as many blocks as its KV pool holds tokens, and
forgets the least recently used first, deepest blocks before their prefixes, as a radix cache evicts its
leaves first.
"""

from collections import OrderedDict
from collections.abc import Sequence

BLOCK_SIZE = 16
# Prefix affinity gives way to balance when the engine holding the prefix has this many more requests in
# flight than the least loaded one (sgl-router's cache-aware policy has such a bound too).
BALANCE_LIMIT = 32


class PrefixRouter:
    def __init__(self, num_engines: int, capacity_tokens: int, block_size: int = BLOCK_SIZE, balance_limit: int = BALANCE_LIMIT):
        self.block_size = block_size
        self.capacity = max(1, capacity_tokens // block_size)
        self.balance_limit = balance_limit
        self._index: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_engines)]

    def block_keys(self, ids: Sequence[int]) -> list[int]:
        """One key per whole block of `ids`, each a hash of the block and the key before it."""
        keys: list[int] = []
        key = 0
        for start in range(0, len(ids) - self.block_size + 1, self.block_size):
            key = hash((key, *ids[start : start + self.block_size]))
            keys.append(key)
        return keys

    def matched_blocks(self, engine: int, keys: list[int]) -> int:
        """How many leading blocks of a prompt (its `keys`) were sent to `engine` and not yet forgotten."""
        index = self._index[engine]
        n = 0
        while n < len(keys) and keys[n] in index:
            n += 1
        return n

    def route(self, keys: list[int], loads: Sequence[int]) -> int:
        """The engine for a prompt: the longest matched prefix (at least one block; ties to the less loaded,
        then the lower rank) unless that engine is `balance_limit` requests busier than the least loaded,
        else the least loaded (ties to the lower rank). `loads` are the requests in flight per engine."""
        least = min(range(len(loads)), key=lambda e: (loads[e], e))
        best, best_len = least, 0
        for engine in range(len(loads)):
            n = self.matched_blocks(engine, keys)
            if n > best_len or n == best_len and n and loads[engine] < loads[best]:
                best, best_len = engine, n
        if best_len == 0 or loads[best] - loads[least] >= self.balance_limit:
            return least
        return best

    def record(self, engine: int, keys: list[int]) -> None:
        """Notes that `engine` was sent the prompt of `keys`: its prefix becomes the most recently used."""
        index = self._index[engine]
        for key in reversed(keys):  # the first block ends most recent, so the deepest is forgotten first
            index[key] = None
            index.move_to_end(key)
        while len(index) > self.capacity:
            index.popitem(last=False)

    def forget(self, engine: int) -> None:
        """Empties an engine's index (its radix cache was flushed)."""
        self._index[engine].clear()
