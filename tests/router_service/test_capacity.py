"""Expert capacity over an engine step (router_service/gate.py ``limit_capacity``): ``drop`` keeps what the
per-call Switch limit keeps, a step split into calls with the used counts carried equals the whole step,
``reroute`` never fills an expert past its capacity and moves each overflowed assignment to the best expert
with room; dropped assignments are neither sent nor counted (dispatch, load recorder)."""

from __future__ import annotations

import pytest
import torch

from moeyard.router_service.gate import (
    apply_capacity,
    count_dropped,
    expert_capacity,
    limit_capacity,
)


def _routing(t: int, e: int, a: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(t, e, generator=g) * 2, dim=-1)
    weights, ids = torch.topk(scores, a, dim=-1)
    return weights, ids, scores


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.25, 4.0])
def test_drop_keeps_what_the_switch_limit_keeps(factor):
    e, a = 8, 2
    weights, ids, _ = _routing(40, e, a, seed=1)
    cap = expert_capacity(40, a, e, factor)
    res = limit_capacity(weights, ids, e, cap)
    want_w, _ = apply_capacity(weights, ids, e, factor)
    assert res.dropped == count_dropped(ids, e, factor) and res.rerouted == 0
    torch.testing.assert_close(res.weights, want_w, rtol=0, atol=0)
    assert torch.equal(res.ids, torch.where(want_w > 0, ids, -1))
    assert torch.equal(res.load, torch.bincount(ids[res.ids >= 0], minlength=e))
    assert int(res.load.max()) <= cap


def test_a_step_split_into_calls_equals_the_whole_step():
    e, a, t = 8, 2, 41
    weights, ids, scores = _routing(t, e, a, seed=2)
    cap = expert_capacity(t, a, e, 0.6)
    for policy in ("drop", "reroute"):
        whole = limit_capacity(weights, ids, e, cap, policy=policy, scores=scores)
        first = limit_capacity(weights[:17], ids[:17], e, cap, policy=policy, scores=scores[:17])
        second = limit_capacity(weights[17:], ids[17:], e, cap, first.load, policy, scores[17:])
        assert torch.equal(torch.cat([first.ids, second.ids]), whole.ids), policy
        assert torch.equal(torch.cat([first.weights, second.weights]), whole.weights), policy
        assert (first.dropped + second.dropped, first.rerouted + second.rerouted) == (whole.dropped, whole.rerouted)
        assert torch.equal(second.load, whole.load) and int(second.load.max()) <= cap
        assert whole.overflowed > 0 and (policy == "drop") == (whole.rerouted == 0)


def test_reroute_fills_no_expert_past_capacity_and_takes_the_best_with_room():
    e, a, t = 8, 2, 64
    weights, ids, scores = _routing(t, e, a, seed=3)
    for factor in (0.3, 0.6, 1.0):
        cap = expert_capacity(t, a, e, factor)
        res = limit_capacity(weights, ids, e, cap, policy="reroute", scores=scores)
        sent = res.ids[res.ids >= 0]
        assert int(torch.bincount(sent, minlength=e).max()) <= cap, factor
        assert torch.equal(res.load, torch.bincount(sent, minlength=e))
        assert res.dropped >= max(0, t * a - e * cap) and res.rerouted > 0, factor
        with_room = {x for x in range(e) if int(res.load[x]) < cap}
        for tok, k in (res.ids < 0).nonzero().tolist():        # dropped only where every expert with room
            assert with_room <= set(ids[tok].tolist()) | set(res.ids[tok].tolist()), (factor, tok)
        for row in range(t):
            chosen = [x for x in res.ids[row].tolist() if x >= 0]
            assert len(chosen) == len(set(chosen))            # never the same expert twice for one token
        # up to the first overflow every assignment is the gate's own
        first = int((limit_capacity(weights, ids, e, cap).ids < 0).reshape(-1).nonzero()[0])
        assert torch.equal(res.ids.reshape(-1)[:first], ids.reshape(-1)[:first])
    # by hand: capacity 1; token 0 takes experts 0 and 1; token 1 wants them too and gets its best others
    # with room (2, then 3), weighted by the score ratio of the slot they replace
    scores = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.5, 0.2, 0.3, 0.1]])
    ids = torch.tensor([[0, 1], [0, 1]])
    weights = torch.tensor([[0.6, 0.3], [0.5, 0.2]])
    res = limit_capacity(weights, ids, 4, 1, policy="reroute", scores=scores)
    assert res.ids.tolist() == [[0, 1], [2, 3]] and res.rerouted == 2 and res.dropped == 0
    assert res.weights[1].tolist() == pytest.approx([0.5 * 0.3 / 0.5, 0.2 * 0.1 / 0.2])


def test_bad_policy_and_missing_scores_are_named():
    weights, ids, _ = _routing(4, 4, 2, seed=4)
    with pytest.raises(ValueError, match="overflow policy must be one of drop, reroute, got 'spill'"):
        limit_capacity(weights, ids, 4, 1, policy="spill")
    with pytest.raises(ValueError, match=r"reroute needs the gate's scores \[T=4, E=4\]"):
        limit_capacity(weights, ids, 4, 1, policy="reroute")


class _CountingTransport:
    """The in-process transport, counting the (token, expert) rows each call sends."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def submit(self, moe_layer, batches, epoch):
        self.rows.append(sum(int(b.token_rows.numel()) for b in batches))
        return self.inner.submit(moe_layer, batches, epoch)

    def refresh(self, shard):
        self.inner.refresh(shard)


def test_dropped_assignments_are_neither_sent_nor_counted(hf_models):
    """ids ``-1`` (dropped): the layer's output equals the same routing with those weights zeroed, fewer
    rows go to the shards, the load recorder counts only what was sent, and a replicated placement with two
    shards splits the rest as usual."""
    from moeyard.attention.engine import build_local_experts
    from moeyard.model.checkpoint import CheckpointReader
    from moeyard.model.spec import load_spec
    from moeyard.router_service.dispatch import ExpertDispatcher
    from moeyard.router_service.load_recorder import LoadRecorder
    from moeyard.router_service.placement import Placement

    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    placement = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1]] * 2), 2)
    inner = build_local_experts(ckpt, spec, placement, torch.float32, CheckpointReader(ckpt))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)])
    w = torch.rand(30, 2, generator=g)
    drop = torch.rand(30, 2, generator=g) < 0.3
    drop[4] = True                                                   # a token with nothing sent at all
    counting = _CountingTransport(inner)
    recorder = LoadRecorder(2, 8, placement.num_slots)
    d = ExpertDispatcher(placement, counting, recorder=recorder)
    got = d.finish(d.submit(1, x, torch.where(drop, 0.0, w), torch.where(drop, -1, ids), has_dropped=True))
    want = ExpertDispatcher(placement, inner)(1, x, torch.where(drop, 0.0, w), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counting.rows == [int((~drop).sum())]
    assert torch.equal(got[4], torch.zeros_like(got[4]))
    snap = recorder.take()
    assert torch.equal(snap.expert_counts[1], torch.bincount(ids[~drop], minlength=8))
    assert int(snap.slot_counts[1].sum()) == int((~drop).sum()) and snap.tokens == 30
