"""Placement: log2phy/logcnt derivation, round-robin invariants, slot choice."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeyard.router_service.placement import Placement, rank_within_expert, round_robin_placement


def _ref_tables(phy2log: list[list[int]]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """logcnt and log2phy by plain loops: copies of each expert listed by ascending slot."""
    num_experts = max(max(row) for row in phy2log) + 1
    logcnt, slots_of = [], []
    for row in phy2log:
        per = [[p for p, e in enumerate(row) if e == expert] for expert in range(num_experts)]
        logcnt.append([len(s) for s in per])
        slots_of.append(per)
    r = max(max(c) for c in logcnt)
    log2phy = [[s + [-1] * (r - len(s)) for s in per] for per in slots_of]
    return logcnt, log2phy


@st.composite
def _phy2log(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 6))
    shards = draw(st.integers(1, 3))
    per_shard = draw(st.integers(-(-experts // shards), 6))
    slots = shards * per_shard
    rows = []
    for _ in range(layers):
        # every expert once, then arbitrary redundant copies, in a random slot order
        row = list(range(experts)) + draw(st.lists(st.integers(0, experts - 1),
                                                   min_size=slots - experts, max_size=slots - experts))
        rows.append(draw(st.permutations(row)))
    return rows, shards


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(_phy2log())
def test_log2phy_and_logcnt_match_loops(case):
    rows, shards = case
    pl = Placement(torch.tensor(rows), shards)
    logcnt, log2phy = _ref_tables(rows)
    assert pl.logcnt.tolist() == logcnt
    assert pl.log2phy.tolist() == log2phy
    assert pl.num_layers == len(rows) and pl.num_slots == len(rows[0])
    assert pl.slots_per_shard * shards == pl.num_slots
    pl.validate(len(logcnt[0]))
    # shard_slots partitions the slots, shard by shard, with the right experts
    for layer, row in enumerate(rows):
        seen = []
        for shard in range(shards):
            pairs = pl.shard_slots(shard)[layer]
            assert all(pl.shard_of(p) == shard for p, _ in pairs)
            assert all(row[p] == e for p, e in pairs)
            seen.extend(p for p, _ in pairs)
        assert seen == list(range(len(row)))


def test_log2phy_explicit_example():
    # layer 0: expert 1 in slots 0 and 3; layer 1: expert 0 in slots 1, 2, 3
    pl = Placement(torch.tensor([[1, 0, 2, 1], [2, 0, 0, 0]]), num_shards=2)
    assert pl.logcnt.tolist() == [[1, 2, 1], [3, 0, 1]]
    assert pl.log2phy.tolist() == [[[1, -1, -1], [0, 3, -1], [2, -1, -1]],
                                   [[1, 2, 3], [-1, -1, -1], [0, -1, -1]]]
    with pytest.raises(ValueError, match=r"missing \(layer, expert\): \[\[1, 1\]\]"):
        pl.validate(3)
    with pytest.raises(ValueError, match="every one of 4 experts"):
        pl.validate(4)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="evenly"):
        Placement(torch.tensor([[0, 1, 2]]), num_shards=2)
    with pytest.raises(ValueError, match=r"\[L, P\]"):
        Placement(torch.tensor([0, 1]), num_shards=1)
    with pytest.raises(ValueError):
        Placement(torch.tensor([[0, 1]]), num_shards=0)


@pytest.mark.parametrize("experts,shards,per_shard", [
    (8, 1, None), (8, 2, None), (8, 3, None), (8, 3, 4), (8, 4, 2), (5, 2, 7), (1, 3, 1)])
def test_round_robin_invariants(experts, shards, per_shard):
    pl = round_robin_placement(3, experts, shards, per_shard, epoch=7)
    expected_per_shard = per_shard if per_shard is not None else -(-experts // shards)
    assert pl.epoch == 7
    assert pl.num_shards == shards
    assert pl.slots_per_shard == expected_per_shard
    assert pl.num_slots == shards * expected_per_shard
    assert pl.num_layers == 3 and pl.num_experts == experts
    assert bool((pl.logcnt >= 1).all())
    assert int(pl.logcnt.sum(1).max()) == pl.num_slots
    pl.validate(experts)
    for shard in range(shards):
        per_layer = pl.shard_slots(shard)
        assert all(len(pairs) == expected_per_shard for pairs in per_layer.values())
    # copies differ by at most one between experts
    assert int(pl.logcnt.max() - pl.logcnt.min()) <= 1


@pytest.mark.parametrize("experts,shards,per_shard", [(8, 3, 2), (8, 1, 7), (4, 2, 1)])
def test_round_robin_refuses_too_few_slots(experts, shards, per_shard):
    with pytest.raises(ValueError, match=f"cannot hold {experts} experts"):
        round_robin_placement(2, experts, shards, per_shard)


def test_choose_slots_hold_the_right_expert():
    pl = round_robin_placement(2, 8, 3, 5)  # 15 slots: experts 0..6 have two copies
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(50)])
    for layer in range(2):
        slots = pl.choose_slots(layer, ids)
        assert slots.shape == ids.shape
        assert bool((slots >= 0).all()) and bool((slots < pl.num_slots).all())
        assert torch.equal(pl.phy2log[layer][slots], ids)
        assert torch.equal(pl.choose_slots(layer, ids), slots)  # deterministic


def test_rank_within_expert_counts_earlier_assignments_of_the_same_expert():
    ids = torch.tensor([[3, 1], [1, 3], [2, 3], [1, 0]])
    assert rank_within_expert(ids).tolist() == [[0, 0], [1, 1], [0, 2], [2, 0]]


def test_choose_slots_splits_each_expert_evenly_whatever_rows_it_sits_in():
    # expert 3 has copies in slots 0 and 3; it is chosen by every even row only (a batch whose
    # requests keep their rows, as in lockstep decode): choosing by row index sent all to one copy
    pl = Placement(torch.tensor([[3, 0, 1, 3, 2, 4, 5, 6]]), num_shards=2)
    ids = torch.tensor([[3, 0] if t % 2 == 0 else [1, 2] for t in range(12)])
    use = Counter(pl.choose_slots(0, ids)[ids == 3].tolist())
    assert use == {0: 3, 3: 3}


def test_choose_slots_turn_rotates_the_copy_of_a_lone_assignment():
    pl = Placement(torch.tensor([[3, 0, 1, 3, 2, 4, 5, 6]]), num_shards=2)
    ids = torch.tensor([[3, 0]])
    assert [int(pl.choose_slots(0, ids, turn)[0, 0]) for turn in range(4)] == [0, 3, 0, 3]
    assert torch.equal(pl.choose_slots(0, ids, 1), pl.choose_slots(0, ids, 1))  # deterministic


def test_choose_slots_spreads_over_copies():
    # expert 3 has three copies, on three different shards
    row = [3, 0, 1, 3, 2, 4, 3, 5, 6]
    pl = Placement(torch.tensor([row]), num_shards=3)
    ids = torch.full((30, 1), 3)
    slots = pl.choose_slots(0, ids).reshape(-1).tolist()
    use = Counter(slots)
    assert set(use) == {0, 3, 6}
    assert max(use.values()) - min(use.values()) <= 1
    assert {pl.shard_of(s) for s in use} == {0, 1, 2}
    # an expert with one copy always goes there
    assert set(pl.choose_slots(0, torch.full((7, 2), 4)).reshape(-1).tolist()) == {5}
