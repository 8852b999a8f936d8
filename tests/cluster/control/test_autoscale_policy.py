"""The rebalance decision: threshold, sustain, cool-down, gain, force."""

import torch

from bench.synthetic_load import zipf_load
from moeyard.cluster.control.autoscale_policy import PolicyState, decide
from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.router_service.placement import round_robin_placement
from moeyard.router_service.planner import min_balancedness

S = AutoscalerSettings(threshold=0.9, sustain_s=5, cooldown_s=30, min_gain=0.05, min_tokens=100)


def _skewed():
    load = zipf_load(3, 8, 1.2, seed=0)
    cur = round_robin_placement(3, 8, 2, 5)
    assert min_balancedness(load, cur) < 0.9
    return load, cur


def test_too_little_load_holds():
    _, cur = _skewed()
    d = decide(torch.zeros(3, 8), cur, PolicyState(), S, now=0)
    assert not d.act and "not enough load" in d.reason


def test_balanced_holds_and_resets_the_clock():
    cur = round_robin_placement(3, 8, 2, 5)
    state = PolicyState(below_since=1.0)
    d = decide(torch.ones(3, 8) * 100, cur, state, AutoscalerSettings(threshold=0.5, min_tokens=1), now=10)
    assert not d.act and d.reason.startswith("balanced") and state.below_since is None


def test_sustain_then_act_then_cooldown():
    load, cur = _skewed()
    state = PolicyState()
    d0 = decide(load, cur, state, S, now=100)
    assert not d0.act and "for 0.0s" in d0.reason and state.below_since == 100
    d1 = decide(load, cur, state, S, now=106)
    assert d1.act, d1.reason
    assert d1.plan is not None and d1.plan.epoch == cur.epoch  # the migrator assigns epochs
    assert d1.balancedness_after > d1.balancedness_before + S.min_gain
    assert d1.slots_moved > 0
    d1.plan.validate(8)
    state.last_move = 106
    d2 = decide(load, cur, state, S, now=110)
    assert not d2.act and d2.reason.startswith("cool-down")


def test_small_gain_holds():
    load, cur = _skewed()
    state = PolicyState(below_since=0)
    d = decide(load, cur, state, S.model_copy(update={"min_gain": 0.99}), now=100)
    assert not d.act and d.reason.startswith("gain too small")


def test_force_skips_threshold_and_cooldown():
    load, cur = _skewed()
    state = PolicyState(last_move=99)
    d = decide(load, cur, state, S, now=100, force=True)
    assert d.act and d.reason.startswith("forced")


def test_plan_equal_to_current_is_not_applied():
    load, cur = _skewed()
    d = decide(load, cur, PolicyState(), S, now=0, force=True)
    again = decide(load, d.plan, PolicyState(), S, now=0, force=True)
    assert not again.act and "equals the current placement" in again.reason


def test_scale_decisions_respect_bounds_sustain_and_cooldown():
    import pytest
    from pydantic import ValidationError

    from moeyard.cluster.control.autoscale_policy import decide_scale

    s = AutoscalerSettings(min_shards=2, max_shards=3, scale_up_load=1000, scale_down_load=300, sustain_s=5,
                           cooldown_s=30)
    st = PolicyState()
    assert decide_scale(2000, 2, st, s, now=0)[0] == 0  # pending
    step, why = decide_scale(2000, 2, st, s, now=6)
    assert step == 1 and "2 -> 3 shards" in why
    assert decide_scale(2000, 3, PolicyState(), s, now=100)[0] == 0  # at max_shards
    st = PolicyState(last_move=90)
    decide_scale(100, 3, st, s, now=95)
    assert decide_scale(100, 3, st, s, now=101)[1].endswith("cool-down")
    assert decide_scale(100, 3, st, s, now=125)[0] == -1
    assert decide_scale(100, 2, PolicyState(), s, now=0)[0] == 0  # at min_shards
    assert decide_scale(500, 2, PolicyState(), s, now=0) == (0, "500 tokens/s per shard on 2 shards: within bounds")
    assert decide_scale(5000, 2, PolicyState(), AutoscalerSettings(), now=0) == (0, "shard scaling off")
    with pytest.raises(ValidationError, match="both"):
        AutoscalerSettings(min_shards=2)
    with pytest.raises(ValidationError, match="at most half"):
        AutoscalerSettings(min_shards=1, max_shards=4, scale_up_load=100, scale_down_load=60)
