"""The data-parallel router's policy: longest recorded prefix, else least loaded, bounded and flushable."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.serving.api.dp_router import PrefixRouter

B = 4  # block size in these tests


def router(engines: int = 2, capacity_tokens: int = 1 << 20, balance_limit: int = 32) -> PrefixRouter:
    return PrefixRouter(engines, capacity_tokens, block_size=B, balance_limit=balance_limit)


def send(r: PrefixRouter, ids: list[int], loads: list[int]) -> int:
    keys = r.block_keys(ids)
    engine = r.route(keys, loads)
    r.record(engine, keys)
    return engine


def test_block_keys_cover_whole_blocks_and_chain_the_prefix():
    r = router()
    assert r.block_keys([1, 2, 3]) == []
    a = r.block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2
    assert r.block_keys([1, 2, 3, 4, 5, 6, 7, 8]) == a
    # the same second block after a different first one is a different key
    assert r.block_keys([0, 2, 3, 4, 5, 6, 7, 8])[1] != a[1]


def test_no_match_goes_to_least_loaded_ties_to_lower_rank():
    r = router(engines=3)
    assert r.route(r.block_keys(list(range(8))), [2, 1, 1]) == 1
    assert r.route(r.block_keys(list(range(8))), [0, 0, 0]) == 0
    assert r.route([], [3, 0, 5]) == 1  # shorter than a block: no prefix to match


def test_repeated_prefix_goes_back_to_its_engine():
    r = router()
    prefix = list(range(100, 116))
    first = send(r, prefix + [1, 2], [1, 0])
    assert first == 1
    # the other engine is now less loaded, but the prefix was sent to `first`
    assert send(r, prefix + [7, 8, 9], [0, 5]) == first
    assert r.matched_blocks(first, r.block_keys(prefix)) == 4
    assert r.matched_blocks(1 - first, r.block_keys(prefix)) == 0


def test_longest_match_wins():
    r = router()
    r.record(0, r.block_keys(list(range(8))))
    r.record(1, r.block_keys(list(range(16))))
    assert r.route(r.block_keys(list(range(20))), [0, 3]) == 1
    assert r.route(r.block_keys(list(range(6))), [0, 3]) == 0  # one block: both match, the less loaded


def test_balance_limit_overrides_affinity():
    r = router(balance_limit=4)
    keys = r.block_keys(list(range(16)))
    r.record(0, keys)
    assert r.route(keys, [3, 0]) == 0
    assert r.route(keys, [4, 0]) == 1


def test_capacity_forgets_deepest_blocks_first():
    r = router(capacity_tokens=3 * B)
    long = r.block_keys(list(range(4 * B)))
    r.record(0, long)
    # four blocks, room for three: the last block went, the prefix stays
    assert r.matched_blocks(0, long) == 3
    other = r.block_keys([9] * (2 * B))
    r.record(0, other)
    assert r.matched_blocks(0, other) == 2
    assert r.matched_blocks(0, long) == 1


def test_forget_clears_one_engine():
    r = router()
    keys = r.block_keys(list(range(8)))
    r.record(0, keys)
    r.record(1, keys)
    r.forget(0)
    assert r.matched_blocks(0, keys) == 0
    assert r.matched_blocks(1, keys) == 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2), max_size=12)), max_size=40),
    st.integers(1, 4),
)
def test_route_is_the_best_match_or_the_least_loaded(requests, engines):
    """Whatever was sent before: the choice is a valid rank, has the longest match when one reaches a block
    and balance allows, and is otherwise the least loaded."""
    r = router(engines=engines, capacity_tokens=8 * B)
    loads = [0] * engines
    for prefix_id, tail in requests:
        ids = [prefix_id] * (2 * B) + tail
        keys = r.block_keys(ids)
        matches = [r.matched_blocks(e, keys) for e in range(engines)]
        engine = r.route(keys, loads)
        least = min(range(engines), key=lambda e: (loads[e], e))
        assert 0 <= engine < engines
        if max(matches) == 0:
            assert engine == least
        elif max(loads) - loads[least] < 32:  # balance cannot override: the longest match
            assert matches[engine] == max(matches)
        else:
            assert engine == least or matches[engine] == max(matches)
        r.record(engine, keys)
        assert r.matched_blocks(engine, keys) == min(len(keys), 8)
        loads[engine] += 1
