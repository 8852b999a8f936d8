"""Planner: invariants, quality against a greedy baseline, few moves, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.synthetic_load import zipf_load
from moeyard.router_service.placement import Placement, round_robin_placement
from moeyard.router_service.planner import (
    balancedness,
    count_moves,
    greedy_baseline,
    min_balancedness,
    placement_shard_load,
    plan_placement,
)


def check_invariants(p: Placement, L: int, E: int, N: int, S: int) -> None:
    assert p.phy2log.shape == (L, N * S) and p.phy2log.dtype == torch.int64
    assert p.num_shards == N and p.slots_per_shard == S
    assert p.logcnt.shape == (L, E)
    assert bool((p.logcnt >= 1).all())
    assert bool((p.logcnt.sum(dim=1) == N * S).all())
    assert int(p.phy2log.min()) >= 0 and int(p.phy2log.max()) < E
    p.validate(E)
    # no two copies of one expert on a shard when each expert has at most N copies
    per_shard = p.phy2log.view(L, N, S)
    for layer in range(L):
        if int(p.logcnt[layer].max()) <= N:
            for n in range(N):
                assert len(set(per_shard[layer, n].tolist())) == S


def test_balancedness_definition():
    x = torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    assert torch.allclose(balancedness(x), torch.tensor([4 / 3 / 2, 1.0, 1.0], dtype=torch.float64))


def test_shard_load_splits_evenly_over_copies():
    p = Placement(torch.tensor([[0, 1, 0, 2]]), num_shards=2)  # shard 0: {0, 1}, shard 1: {0, 2}
    sl = placement_shard_load(torch.tensor([[10.0, 4.0, 6.0]]), p)
    assert sl.tolist() == [[9.0, 11.0]]
    assert min_balancedness(torch.tensor([[10.0, 4.0, 6.0]]), p) == pytest.approx(10 / 11)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(L=st.integers(1, 3), E=st.integers(1, 12), N=st.integers(1, 6), extra=st.integers(0, 6),
       seed=st.integers(0, 10_000), zeros=st.booleans())
def test_invariants_and_beats_baseline_random(L, E, N, extra, seed, zeros):
    S = max(1, -(-E // N)) + extra // 3
    if N * S < E:
        S += 1
    rng = np.random.default_rng(seed)
    load = torch.tensor(rng.integers(0, 1000, size=(L, E)), dtype=torch.float64)
    if zeros:
        load[0] = 0
    p = plan_placement(load, N, S)
    check_invariants(p, L, E, N, S)
    base = greedy_baseline(load, N, S)
    check_invariants(base, L, E, N, S)
    assert min_balancedness(load, p) >= min_balancedness(load, base) - 1e-12
    # every layer, not just the minimum
    after = balancedness(placement_shard_load(load, p))
    ref = balancedness(placement_shard_load(load, base))
    assert bool((after >= ref - 1e-12).all())
    assert count_moves(p, plan_placement(load, N, S, current=p)) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("E,N,S", [(256, 64, 5), (64, 16, 5), (32, 8, 5)])
def test_zipf_skew_with_25pct_redundancy(seed, E, N, S):
    L = 4
    load = zipf_load(L, E, seed=seed)
    p = plan_placement(load, N, S)
    check_invariants(p, L, E, N, S)
    after = min_balancedness(load, p)
    base = min_balancedness(load, greedy_baseline(load, N, S))
    static = min_balancedness(load, round_robin_placement(L, E, N, S))
    assert after >= base and after >= static
    assert after >= 0.9, (after, base, static)
    print(f"E={E} N={N} S={S} seed={seed}: static {static:.3f} greedy {base:.3f} planned {after:.4f}")


def test_replan_same_load_moves_nothing_and_bumps_epoch():
    load = zipf_load(6, 64, seed=3)
    p = plan_placement(load, 16, 5, epoch=7)
    assert p.epoch == 7
    again = plan_placement(load, 16, 5, current=p)
    assert count_moves(p, again) == 0 and again.epoch == 8


def test_replan_after_drift_keeps_most_slots():
    load = zipf_load(6, 64, seed=4)
    p = plan_placement(load, 16, 5)
    drifted = load * torch.tensor(np.random.default_rng(5).uniform(0.9, 1.1, size=load.shape))
    fresh = plan_placement(drifted, 16, 5)
    kept = plan_placement(drifted, 16, 5, current=p)
    # same shard multisets as the fresh plan, only relabelled
    assert sorted(map(sorted, kept.phy2log.view(6, 16, 5).reshape(-1, 5).tolist())) == \
        sorted(map(sorted, fresh.phy2log.view(6, 16, 5).reshape(-1, 5).tolist()))
    assert min_balancedness(drifted, kept) == pytest.approx(min_balancedness(drifted, fresh))
    assert count_moves(p, kept) <= count_moves(p, fresh)
    check_invariants(kept, 6, 64, 16, 5)


def test_current_of_other_shape_is_ignored():
    load = zipf_load(2, 16, seed=6)
    other = round_robin_placement(2, 16, 4, 5)
    p = plan_placement(load, 8, 3, current=other)
    check_invariants(p, 2, 16, 8, 3)


def test_errors():
    with pytest.raises(ValueError, match="fewer than experts"):
        plan_placement(torch.ones(2, 10), 3, 3)
    with pytest.raises(ValueError, match="fewer than experts"):
        greedy_baseline(torch.ones(2, 10), 3, 3)
    with pytest.raises(ValueError, match=r"\[L, E\]"):
        plan_placement(torch.ones(10), 4, 3)
    with pytest.raises(ValueError, match=r"\[L, E\]"):
        plan_placement(torch.ones(2, 3, 4), 4, 3)
    with pytest.raises(ValueError, match="negative"):
        plan_placement(torch.tensor([[1.0, -1.0]]), 2, 1)
    with pytest.raises(ValueError, match="finite"):
        plan_placement(torch.tensor([[1.0, float("nan")]]), 2, 1)
    with pytest.raises(ValueError, match="shape"):
        count_moves(round_robin_placement(1, 4, 2, 2), round_robin_placement(1, 4, 2, 3))
