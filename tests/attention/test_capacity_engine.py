"""MoE serving options in the engine: the capacity factor counts over a whole step (micro-batches split
by overlap give the same tokens and counts), a factor too large to bind changes nothing, the counted drops
equal a reference from the gate alone, ``reroute`` never sends an expert more than its capacity, and a
``top_k_override`` equal to the checkpoint's is the default."""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.router_service.gate import count_dropped, expert_capacity, router_logits, select_experts

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [11, 12, 13], [40, 41, 42, 43, 44, 45], [7, 7, 7, 8]]
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def _engine(ckpt, **kw) -> LLMEngine:
    return LLMEngine(ckpt, EngineConfig(dtype="float32", **kw))


class _StepLog:
    """Per engine step, per MoE layer: the hidden states the router gated and the ids it sent."""

    def __init__(self, engine: LLMEngine):
        self.steps: list[dict[int, dict[str, list[torch.Tensor]]]] = []
        router = engine.router
        begin, route, submit = router.begin_step, router.route, router.dispatcher.submit

        def begin_step(n):
            self.steps.append({})
            begin(n)

        def logged_route(layer, hidden):
            self.steps[-1].setdefault(layer, {"hidden": [], "ids": []})["hidden"].append(hidden.clone())
            return route(layer, hidden)

        def logged_submit(layer, hidden, weights, ids, has_dropped=False):
            self.steps[-1][layer]["ids"].append(ids.clone())
            return submit(layer, hidden, weights, ids, has_dropped)

        router.begin_step, router.route, router.dispatcher.submit = begin_step, logged_route, logged_submit


def test_a_factor_that_never_binds_changes_nothing(hf_models):
    ckpt, _ = hf_models("mixtral")
    want = _engine(ckpt).generate(PROMPTS, PARAMS)
    for overflow in ("drop", "reroute"):
        eng = _engine(ckpt, capacity_factor=100.0, overflow=overflow)
        assert eng.generate(PROMPTS, PARAMS) == want
        assert eng.router.overflow_counts().dropped == (0, 0) and eng.router.overflow_counts().rerouted == (0, 0)


@pytest.mark.parametrize("overflow", ["drop", "reroute"])
def test_capacity_counts_over_the_step_whatever_the_micro_batches(hf_models, overflow):
    ckpt, _ = hf_models("mixtral")
    whole = _engine(ckpt, capacity_factor=0.5, overflow=overflow)
    split = _engine(ckpt, capacity_factor=0.5, overflow=overflow, overlap=True, overlap_mode="always")
    split_log = _StepLog(split)
    got_whole, got_split = whole.generate(PROMPTS, PARAMS), split.generate(PROMPTS, PARAMS)
    assert got_split == got_whole
    assert split.router.overflow_counts() == whole.router.overflow_counts()
    assert any(len(layer["hidden"]) == 2 for step in split_log.steps for layer in step.values())  # it split
    counts = whole.router.overflow_counts()
    assert sum(counts.dropped) + sum(counts.rerouted) > 0          # the factor binds on this workload
    assert got_whole != _engine(ckpt).generate(PROMPTS, PARAMS)


def test_counted_drops_equal_a_reference_from_the_gate_alone(hf_models):
    ckpt, _ = hf_models("mixtral")
    eng = _engine(ckpt, capacity_factor=0.5, overlap=True, overlap_mode="always")
    log = _StepLog(eng)
    eng.generate(PROMPTS, PARAMS)
    cfg, gates = eng.router.gate_cfg, eng.router.gates
    want = [0, 0]
    for step in log.steps:
        for layer, calls in step.items():
            hidden = torch.cat(calls["hidden"])                         # the whole step, in token order
            _, ids = select_experts(router_logits(hidden, gates[layer].weight, cfg), cfg)
            want[layer] += count_dropped(ids, cfg.num_experts, cfg.capacity_factor)
    assert eng.router.overflow_counts().dropped == tuple(want) and sum(want) > 0


def test_reroute_sends_no_expert_more_than_its_capacity(hf_models):
    ckpt, _ = hf_models("mixtral")
    eng = _engine(ckpt, capacity_factor=0.5, overflow="reroute", overlap=True, overlap_mode="always")
    log = _StepLog(eng)
    eng.generate(PROMPTS, PARAMS)
    cfg = eng.router.gate_cfg
    assert sum(eng.router.overflow_counts().rerouted) > 0
    for step in log.steps:
        for layer, calls in step.items():
            ids = torch.cat(calls["ids"])
            cap = expert_capacity(ids.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            assert int(torch.bincount(ids[ids >= 0], minlength=cfg.num_experts).max()) <= cap


def test_top_k_override(hf_models):
    ckpt, _ = hf_models("mixtral")
    want = _engine(ckpt).generate(PROMPTS, PARAMS)
    assert _engine(ckpt, top_k_override=2).generate(PROMPTS, PARAMS) == want     # the checkpoint's own
    one = _engine(ckpt, top_k_override=1)
    assert one.router.gate_cfg.top_k == 1 and one.generate(PROMPTS, PARAMS) != want
    with pytest.raises(ValueError, match=r"top_k_override \(9\) must be in \[1, num_experts=8\]"):
        _engine(ckpt, top_k_override=9)
    with pytest.raises(ValueError, match="deterministic mode cannot be combined with a capacity factor"):
        _engine(ckpt, capacity_factor=1.0, deterministic=True)
