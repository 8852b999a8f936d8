"""BlockManager: allocation, ref counts, prefix reuse and eviction."""

from __future__ import annotations

import pytest

from moeyard.attention.block_manager import BlockManager, NoFreeBlocks


def test_allocate_and_free_track_ref_counts():
    bm = BlockManager(6, 4)
    assert bm.num_free == 6 and bm.usage() == 0.0
    a = bm.allocate(2)
    b = bm.allocate(3)
    assert len(set(a + b)) == 5 and all(0 <= x < 6 for x in a + b)
    assert all(bm.ref[x] == 1 for x in a + b)
    assert bm.num_free == 1
    assert bm.usage() == pytest.approx(5 / 6)
    bm.free(a)
    assert bm.num_free == 3 and all(bm.ref[x] == 0 for x in a)
    c = bm.allocate(3)  # freed blocks are handed out again
    assert set(a) <= set(c)
    bm.free(b + c)
    assert bm.num_free == 6 and bm.ref == [0] * 6


def test_double_free_raises():
    bm = BlockManager(4, 2)
    blocks = bm.allocate(2)
    bm.free(blocks)
    with pytest.raises(RuntimeError, match=f"block {blocks[0]} freed twice"):
        bm.free(blocks[:1])
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free([3])  # never allocated


def test_no_free_blocks_is_all_or_nothing():
    bm = BlockManager(3, 4)
    bm.allocate(2)
    with pytest.raises(NoFreeBlocks, match="need 2 blocks, 1 free"):
        bm.allocate(2)
    assert bm.num_free == 1  # nothing was taken by the failed call
    bm.allocate(1)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1)


def test_blocks_for_rounds_up():
    bm = BlockManager(8, 4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 4)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def _prefill(bm: BlockManager, tokens: list[int]) -> list[int]:
    """What the scheduler does for a new prompt: reuse a prefix, allocate the rest, register."""
    table = bm.match_prefix(tokens)
    table += bm.allocate(bm.blocks_for(len(tokens)) - len(table))
    bm.register_full_blocks(tokens, table, len(tokens))
    return table


def test_prefix_reuse_shares_full_blocks():
    bm = BlockManager(16, 4)
    first = list(range(100, 110))            # 2 full blocks + 2 tokens
    t1 = _prefill(bm, first)
    assert len(t1) == 3
    second = first[:8] + [7, 7, 7, 7, 7]     # same first two blocks
    got = bm.match_prefix(second)
    assert got == t1[:2]
    assert bm.ref[t1[0]] == bm.ref[t1[1]] == 2
    assert bm.ref[t1[2]] == 1                # the partial block is never shared
    bm.free(got)
    assert bm.ref[t1[0]] == 1


def test_prefix_match_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    prompt = list(range(8))                  # exactly two full blocks
    t1 = _prefill(bm, prompt)
    got = bm.match_prefix(prompt)            # the same prompt again
    assert got == t1[:1]                     # 8 - 4 = 4 tokens left, not 0
    bm.free(got)
    assert bm.match_prefix(prompt[:4]) == []  # one block: nothing reusable
    assert len(bm.match_prefix(prompt + [9])) == 2


def test_prefix_hash_is_chained():
    bm = BlockManager(16, 4)
    base = list(range(20, 32))               # three full blocks
    t1 = _prefill(bm, base)
    # same second block, different first block: no reuse at all
    assert bm.match_prefix([0, 0, 0, 0] + base[4:] + [1]) == []
    # same first block, different second: only the first is shared
    assert bm.match_prefix(base[:4] + [0, 0, 0, 0] + base[8:] + [1]) == t1[:1]


def test_prefix_caching_disabled():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    prompt = list(range(12))
    _prefill(bm, prompt)
    assert bm.match_prefix(prompt + [1]) == []


def test_freed_cached_blocks_stay_reusable_until_needed():
    bm = BlockManager(4, 2)
    prompt = [1, 2, 3, 4]
    t1 = _prefill(bm, prompt)
    bm.free(t1)
    assert bm.num_free == 4                  # cached blocks count as free
    # two plain free blocks exist: allocating two takes those and keeps the cache
    other = bm.allocate(2)
    assert not set(other) & set(t1)
    again = bm.match_prefix(prompt + [5])
    assert again == t1 and all(bm.ref[b] == 1 for b in t1)
    bm.free(again + other)
    # now everything is needed: cached blocks are evicted, and their content forgotten
    everything = bm.allocate(4)
    assert sorted(everything) == [0, 1, 2, 3]
    bm.free(everything)
    assert bm.match_prefix(prompt + [5]) == []


def test_eviction_is_least_recently_freed_first():
    bm = BlockManager(4, 2)
    a = _prefill(bm, [1, 1])                 # one cached block each
    b = _prefill(bm, [2, 2])
    bm.allocate(2)                           # fill the rest
    bm.free(b)
    bm.free(a)                               # a freed last: most recently used
    (taken,) = bm.allocate(1)
    assert taken == b[0]
    assert bm.match_prefix([1, 1, 9]) == a   # a's content survived
    assert bm.match_prefix([2, 2, 9]) == []  # b's was evicted
