"""A shard that stops answering costs a retry on another copy, not a failed step."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from moeyard.attention.engine import build_local_experts
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.spec import load_spec
from moeyard.router_service.dispatch import ExpertDispatcher
from moeyard.router_service.placement import ExpertsUnavailable, Placement
from moeyard.router_service.transport import ShardUnavailable


class FlakyTransport:
    """Wraps the in-process transport; batches for ``dead`` shards fail."""

    def __init__(self, inner, dead: set[int]):
        self.inner, self.dead, self.refreshed = inner, dead, []

    def submit(self, moe_layer, batches, epoch):
        hit = [b.shard for b in batches if b.shard in self.dead]
        if hit:
            f = Future()
            f.set_exception(ShardUnavailable(hit[0], "connection refused"))
            return f
        return self.inner.submit(moe_layer, batches, epoch)

    def refresh(self, shard):
        self.refreshed.append(shard)


def _setup(hf_models, phy2log, shards):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    placement = Placement(torch.tensor(phy2log), shards)
    inner = build_local_experts(ckpt, spec, placement, torch.float32, CheckpointReader(ckpt))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g)
    return placement, inner, x, ids, w


def test_retries_on_another_copy(hf_models):
    # shard 1 holds only copies of experts that shard 0 or 2 also hold
    phy2log = [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]] * 2
    placement, inner, x, ids, w = _setup(hf_models, phy2log, 3)
    expected = ExpertDispatcher(placement, inner)(0, x, w, ids)
    flaky = FlakyTransport(inner, dead={1})
    got = ExpertDispatcher(placement, flaky)(0, x, w, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert flaky.refreshed == [1]


def test_no_copy_left_fails_that_layer(hf_models):
    phy2log = [[0, 1, 2, 3, 4, 5, 6, 7]] * 2
    placement, inner, x, ids, w = _setup(hf_models, phy2log, 2)
    with pytest.raises(ExpertsUnavailable, match="no reachable copy"):
        ExpertDispatcher(placement, FlakyTransport(inner, dead={1}))(0, x, w, ids)


def _patch_routing(engine, prompt_a, prompt_b):
    """Route request A's tokens to expert 7 and keep every other token off it."""
    real_route = engine.router.route

    def route(moe_layer, hidden):
        weights, ids = real_route(moe_layer, hidden)
        ids = ids.clone()
        other = torch.where(ids[:, 0] == 6, 5, 6)  # a substitute that is not the row's other expert
        ids = torch.where(ids == 7, other.unsqueeze(1).expand_as(ids), ids)
        if "A" in engine._seqs:  # A's rows come first in every step A is part of
            rows_a = len(prompt_a) if hidden.shape[0] == len(prompt_a) + len(prompt_b) else 1
            ids[:rows_a, 0] = 7
        return weights, ids

    engine.router.route = route


def test_lost_expert_fails_only_the_requests_routed_to_it(hf_models):
    """Request A's tokens need expert 7, whose only copy is on a dead shard; request B
    never does: A ends with an error, B completes with the tokens it gets when healthy."""
    from moeyard.attention.engine import EngineConfig, LLMEngine
    from moeyard.attention.sequence import SamplingParams

    ckpt, _ = hf_models("mixtral")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt_a, prompt_b = [5, 6, 7, 8, 9], [11, 12, 13]
    healthy = LLMEngine(ckpt, EngineConfig(dtype="float32"))
    _patch_routing(healthy, prompt_a, prompt_b)
    expected_b = healthy.generate([prompt_b], params)[0]

    spec = load_spec(ckpt)
    # shard 1 holds copies of experts 0-6 and the only copy of expert 7
    placement = Placement(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7, 0]] * 2), 2)
    inner = build_local_experts(ckpt, spec, placement, torch.float32, CheckpointReader(ckpt))
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32"), transport=FlakyTransport(inner, dead={1}),
                       placement=placement)
    _patch_routing(engine, prompt_a, prompt_b)
    engine.add_request("A", prompt_a, params)
    engine.add_request("B", prompt_b, params)
    outs: dict[str, list] = {"A": [], "B": []}
    errors = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].extend(o.new_token_ids)
            if o.error:
                errors[o.request_id] = o.error
    assert "no reachable copy" in errors.get("A", "")
    assert "B" not in errors
    assert outs["B"] == expected_b


class FakeClock:
    """``clock`` and ``sleep`` for the dispatcher: sleeping advances time; ``revive`` runs at a time."""

    def __init__(self):
        self.t = 0.0
        self.events: list[tuple[float, object]] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt
        for when, fn in [e for e in self.events if e[0] <= self.t]:
            self.events.remove((when, fn))
            fn()


def test_waits_for_a_restarted_shard_when_no_copy_is_left(hf_models):
    # no copies: shard 1 holds experts 4-7 alone; it "restarts" 3 s after the first failure
    phy2log = [[0, 1, 2, 3, 4, 5, 6, 7]] * 2
    placement, inner, x, ids, w = _setup(hf_models, phy2log, 2)
    expected = ExpertDispatcher(placement, inner)(0, x, w, ids)
    flaky, clock = FlakyTransport(inner, dead={1}), FakeClock()
    clock.events.append((3.0, lambda: flaky.dead.clear()))
    d = ExpertDispatcher(placement, flaky, restart_wait_s=30, clock=clock, sleep=clock.sleep)
    got = d(0, x, w, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert 3.0 <= clock.t < 5.0                       # it waited for the restart, probing about every second
    assert set(flaky.refreshed) == {1}                # and asked for the shard's new address
    assert not d._down                                # the shard is in use again
    torch.testing.assert_close(d(0, x, w, ids), expected, rtol=0, atol=1e-6)


def test_gives_up_after_the_restart_bound(hf_models):
    phy2log = [[0, 1, 2, 3, 4, 5, 6, 7]] * 2
    placement, inner, x, ids, w = _setup(hf_models, phy2log, 2)
    flaky, clock = FlakyTransport(inner, dead={1}), FakeClock()  # never comes back
    d = ExpertDispatcher(placement, flaky, restart_wait_s=5, clock=clock, sleep=clock.sleep)
    with pytest.raises(ExpertsUnavailable) as e:
        d(0, x, w, ids)
    assert 5.0 <= clock.t < 6.5
    # only the tokens routed to shard 1's experts (4-7) are named
    assert sorted(e.value.rows) == [r for r in range(40) if bool((ids[r] >= 4).any())]
