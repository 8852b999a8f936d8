"""Every tensor of the hot path is made on its device: a CPU-only factory would break GPUs.

The process's default device is set to ``meta`` while the engine (and an expert shard) run on the
CPU: any tensor created without an explicit device lands on ``meta``, and the first operation mixing
it with a real tensor (or asking for its value) fails the test. The tokens must equal those of a run
without the guard.
"""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from tests.conftest import FAMILIES
from tests.device_guard import default_device_meta

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
PARAMS = [SamplingParams(max_tokens=6, ignore_eos=True),
          SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True),
          SamplingParams(max_tokens=6, ignore_eos=True)]


def _engine(ckpt) -> LLMEngine:
    # small blocks and token budget: chunked prefill mixed with decodes, several block tables
    return LLMEngine(ckpt, EngineConfig(dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=8,
                                        num_blocks=64))


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_makes_no_tensor_on_the_default_device(family, hf_models):
    ckpt, _ = hf_models(family)
    want = _engine(ckpt).generate(PROMPTS, PARAMS)
    with default_device_meta():
        assert torch.empty(1).device.type == "meta"  # the guard is on
        engine = _engine(ckpt)
        got = engine.generate(PROMPTS, PARAMS)
    assert got == want
    cache = engine.cache.latent[0] if engine.spec.mla else engine.cache.k[0]
    assert cache.device.type == "cpu" and engine.runner.rope.cos.device.type == "cpu"

