"""The overlap tuner: when a step runs as two micro-batches."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.overlap import OverlapTuner, OverlapTunerConfig, size_bucket
from moeyard.attention.sequence import SamplingParams


def _run(tuner: OverlapTuner, steps: int, cost, tokens: int = 64, seqs: int = 64) -> list[bool]:
    """Drive ``steps`` steps where a whole step takes ``cost(False)`` s and a split one ``cost(True)``."""
    modes = []
    for _ in range(steps):
        split = tuner.should_split(tokens, seqs)
        tuner.observe(tokens, seqs, split, cost(split))
        modes.append(split)
    return modes


def test_size_buckets_are_powers_of_two():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 64, 127, 128)] == [1, 1, 2, 2, 3, 3, 4, 7, 7, 8]


def test_always_splits_every_step_with_two_sequences():
    t = OverlapTuner(OverlapTunerConfig("always"))
    assert t.should_split(64, 64) and t.should_split(2, 2)
    assert not t.should_split(100, 1)  # one sequence (a long prefill): nothing to split


@pytest.mark.parametrize("split_faster", [True, False])
def test_adaptive_probes_both_modes_then_keeps_the_faster(split_faster):
    t = OverlapTuner(OverlapTunerConfig("adaptive", probe_steps=3, reprobe_every=1000))
    modes = _run(t, 40, lambda split: 0.05 if split == split_faster else 0.08)
    assert modes[:6].count(True) == 3 and modes[:6].count(False) == 3  # probing: 3 steps each
    assert all(m == split_faster for m in modes[6:])
    (snap,) = t.snapshot().values()
    assert snap["split"] is split_faster
    assert snap["split_s_per_token"] == pytest.approx((0.05 if split_faster else 0.08) / 64)


def test_adaptive_measures_the_idle_mode_again_and_follows_a_change():
    t = OverlapTuner(OverlapTunerConfig("adaptive", probe_steps=2, reprobe_every=20))
    now = {"split_faster": False}
    cost = lambda split: 0.05 if split == now["split_faster"] else 0.08  # noqa: E731
    modes = _run(t, 30, cost)
    assert not any(modes[4:20])
    assert any(modes[20:30])  # re-probed split after 20 steps of the bucket
    now["split_faster"] = True  # e.g. the shards moved to their own devices
    modes = _run(t, 60, cost)
    assert modes[-20:].count(True) >= 16  # split from the next re-probe on (whole is re-probed now and then)


def test_buckets_are_learned_apart():
    t = OverlapTuner(OverlapTunerConfig("adaptive", probe_steps=2, reprobe_every=1000))
    _run(t, 10, lambda split: 0.05 if split else 0.08, tokens=64, seqs=64)   # decode: split wins
    _run(t, 10, lambda split: 0.08 if split else 0.05, tokens=512, seqs=4)   # prefill: whole wins
    assert t.should_split(64, 64) and not t.should_split(512, 4)
    assert sorted(s["split"] for s in t.snapshot().values() if s["split"] is not None) == [False, True]


def test_config_is_checked():
    with pytest.raises(ValueError, match="adaptive"):
        OverlapTunerConfig("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        OverlapTunerConfig(probe_steps=0)


class _SlowTransport:
    """The in-process transport plus a fixed cost per call: splitting doubles the calls, so a whole
    step is faster and the adaptive engine must settle on it."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s = inner, delay_s

    def submit(self, moe_layer, batches, epoch) -> Future:
        time.sleep(self.delay_s)
        return self.inner.submit(moe_layer, batches, epoch)

    def refresh(self, shard):
        pass

    def close(self):
        self.inner.close()


def test_adaptive_engine_settles_on_the_faster_mode_and_keeps_the_tokens(hf_models):
    from moeyard.attention.engine import build_local_experts
    from moeyard.model.spec import load_spec
    from moeyard.router_service.placement import round_robin_placement

    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    placement = round_robin_placement(spec.num_moe_layers, spec.moe.num_experts, 2)
    prompts = [[5 + i, 9, 11 + 2 * i] for i in range(6)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = LLMEngine(ckpt, EngineConfig(dtype="float32")).generate(prompts, params)
    transport = _SlowTransport(build_local_experts(ckpt, spec, placement, __import__("torch").float32), 0.04)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", overlap=True), transport=transport, placement=placement)
    assert engine.generate(prompts, params) == plain
    decode = [s for k, s in engine.overlap_tuner.snapshot().items() if k.startswith("tokens 4-7, seqs 4-7")]
    assert decode and decode[0]["split"] is False
    assert decode[0]["split_s_per_token"] > decode[0]["whole_s_per_token"]
