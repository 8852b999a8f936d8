"""Greedy parity with transformers for every supported family."""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from tests.conftest import FAMILIES

PROMPT_LENS = [5, 11, 17, 26]
NEW_TOKENS = 32


def _prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=model.config.eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, hf_models):
    ckpt, model = hf_models(family)
    # small blocks and a small token budget: prefills are chunked and mixed with decodes
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", block_size=4, max_num_batched_tokens=24,
                                          num_blocks=128))
    prompts = _prompts(engine.spec.vocab_size)
    ours = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(model, prompt, NEW_TOKENS), f"{family}: prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_logits_match(family, hf_models):
    ckpt, model = hf_models(family)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", block_size=4, num_blocks=64))
    prompts = _prompts(engine.spec.vocab_size, seed=11)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=1))
    engine.step()
    ours = engine.last_logits
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts]).float()
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_overlap_microbatches_match_transformers(family, hf_models):
    """Ping-pong micro-batching changes the schedule, not the tokens."""
    ckpt, model = hf_models(family)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", block_size=4, max_num_batched_tokens=24,
                                          num_blocks=128, overlap=True,
                                          overlap_mode="always"))
    prompts = _prompts(engine.spec.vocab_size)
    ours = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(model, prompt, NEW_TOKENS), f"{family}: prompt of {len(prompt)} tokens"


@pytest.fixture
def backend_config(request, monkeypatch):
    """``gather``: the reference kernels (MLA expanded); ``paged_tiles``: the torch kernel one block per
    tile (its online softmax at every step); ``triton``: the Triton kernel in Triton's CPU interpreter."""
    name = request.param
    if name == "paged_tiles":
        from moeyard.attention import paged
        monkeypatch.setattr(paged, "TILE_BYTES", 1)
        return "paged"
    if name == "triton":
        import triton  # noqa: F401  (a test extra, never skipped: it runs in its interpreter, tests/conftest.py)
    return name


@pytest.mark.parametrize("backend_config", ["gather", "paged_tiles", "triton"], indirect=True)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_backend_matches_transformers(family, backend_config, hf_models):
    """Chunked prefills mixed with decodes, prompts of different lengths, on every kernel (and MLA
    both absorbed and, with ``gather``, expanded)."""
    ckpt, model = hf_models(family)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", block_size=4, max_num_batched_tokens=24,
                                          num_blocks=128, attention_backend=backend_config))
    prompts = _prompts(engine.spec.vocab_size, seed=3)
    ours = engine.generate(prompts, SamplingParams(max_tokens=12))
    for prompt, got in zip(prompts, ours):
        assert got == _hf_greedy(model, prompt, 12), f"{family}/{backend_config}: prompt of {len(prompt)} tokens"
