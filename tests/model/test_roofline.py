"""The roofline math against transformers' own modules, and the machine's measured figures."""

from __future__ import annotations

import re

import pytest
import torch

from moeyard.model import hardware
from moeyard.model.roofline import Hardware, decode_step, experts_touched, kv_bytes_per_token, roofline
from moeyard.model.spec import spec_from_config
from tests.conftest import FAMILIES, hf_config

_ROUTED = re.compile(r"\.mlp\.experts\.")


def _matmul_params_per_token(cfg) -> tuple[float, int]:
    """(matmul weights one token multiplies by, all matmul weights) of transformers' model for ``cfg``:
    every weight of 2+ dims but the input embedding, routed experts at ``top_k / E``."""
    import transformers as T

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    spec = spec_from_config(cfg.to_dict())
    per_token = 0.0
    total = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue
        total += p.numel()
        per_token += p.numel() * (spec.moe.top_k / spec.moe.num_experts if _ROUTED.search(name) else 1)
    if cfg.tie_word_embeddings:  # the head is the embedding, which the loop skipped
        per_token += model.lm_head.weight.numel()
        total += model.lm_head.weight.numel()
    return per_token, total


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_flops_and_weights_match_transformers_modules(family):
    cfg = hf_config(family)
    spec = spec_from_config(cfg.to_dict())
    per_token, total = _matmul_params_per_token(cfg)
    cost = decode_step(spec, batch=3, context=0, dtype="float32")
    assert cost.flops == pytest.approx(2 * 3 * per_token, rel=1e-9)
    big = decode_step(spec, batch=100_000, context=0, dtype="bfloat16")   # every expert read
    assert big.weight_bytes == pytest.approx(2 * total, rel=1e-9)
    assert cost.kv_bytes == 0


def test_experts_touched():
    assert experts_touched(8, 2, 1) == pytest.approx(2)
    assert experts_touched(8, 2, 0) == 0
    assert experts_touched(8, 2, 1000) == pytest.approx(8)
    assert experts_touched(256, 8, 2) == pytest.approx(256 * (1 - (1 - 8 / 256) ** 2))


def test_kv_bytes_mla_is_the_latent():
    ds = spec_from_config(hf_config("deepseek_v3").to_dict())
    m = ds.mla
    assert kv_bytes_per_token(ds, 2) == ds.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * 2
    ll = spec_from_config(hf_config("llama").to_dict())
    assert kv_bytes_per_token(ll, 4) == ll.num_layers * 2 * ll.num_kv_heads * ll.head_dim * 4
    assert decode_step(ll, 4, 100, "float32").kv_bytes == 4 * 100 * kv_bytes_per_token(ll, 4)


def test_small_batches_are_memory_bound_large_ones_compute_bound():
    spec = spec_from_config(hf_config("mixtral").to_dict())
    hw = Hardware("toy", {"bfloat16": 1e12}, memory_bandwidth=1e10)
    # (with context, reading the KV cache keeps a decode step memory-bound at any batch: 1 token of it)
    one = roofline(decode_step(spec, 1, 1, "bfloat16"), hw, "bfloat16")
    many = roofline(decode_step(spec, 1 << 16, 1, "bfloat16"), hw, "bfloat16")
    assert one.bound == "memory" and many.bound == "compute"
    assert one.time_s == one.memory_s and many.time_s == many.compute_s
    assert one.fraction(2 * one.time_s) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no peak FLOP/s for float32"):
        roofline(decode_step(spec, 1, 1, "float32"), hw, "float32")


def test_local_measurement_and_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEYARD_CACHE_DIR", str(tmp_path))
    calls = []
    real = hardware.measure_local

    def quick():
        calls.append(1)
        return real(quick=True)

    monkeypatch.setattr(hardware, "measure_local", quick)
    hw = hardware.local_hardware()
    assert hw.peak_flops["float32"] > 1e8 and hw.peak_flops["bfloat16"] > 1e7
    assert hw.memory_bandwidth > 1e8 and hw.details["read_bandwidth"] > 0
    assert hardware.cpu_model() in hw.source
    assert hardware.local_hardware() == hw and len(calls) == 1      # read back from the cache
    next(tmp_path.glob("hardware/local-*.json")).write_text("{not json")
    assert hardware.local_hardware().name == "local" and len(calls) == 2   # a damaged entry: measured again
