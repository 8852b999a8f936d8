"""Our rope scaling (llama3, yarn, linear) against transformers' ROPE_INIT_FUNCTIONS."""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.rope import RotaryEmbedding, inv_freq_and_scale
from moeyard.model.spec import spec_from_config


def _llama(head_dim: int, max_pos: int, rope: dict):
    import transformers as T

    return T.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4, head_dim=head_dim,
                         intermediate_size=64, num_hidden_layers=1, vocab_size=32,
                         max_position_embeddings=max_pos, rope_parameters=rope)


def _qwen2(max_pos: int, rope: dict):
    import transformers as T

    return T.Qwen2Config(hidden_size=512, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                         num_hidden_layers=1, vocab_size=32, max_position_embeddings=max_pos, rope_parameters=rope)


def _deepseek_v3(rope_dim: int, max_pos: int, rope: dict):
    import transformers as T

    return T.DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
                              moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                              topk_group=1, num_hidden_layers=1, vocab_size=32, kv_lora_rank=16, q_lora_rank=None,
                              qk_nope_head_dim=16, qk_rope_head_dim=rope_dim, v_head_dim=16,
                              max_position_embeddings=max_pos, rope_parameters=rope)


CASES = {
    # Llama 3.1 8B / 70B
    "llama3.1": lambda: _llama(128, 131072, dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=8192)),
    # Llama 3.2 1B/3B
    "llama3.2": lambda: _llama(64, 131072, dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=8192)),
    # unusual factors and a short original context: many channels in the smoothed band
    "llama3-odd": lambda: _llama(64, 8192, dict(rope_type="llama3", rope_theta=10000.0, factor=4.0,
                                                low_freq_factor=2.0, high_freq_factor=8.0,
                                                original_max_position_embeddings=512)),
    # Qwen2.5 with yarn x4
    "yarn-qwen2": lambda: _qwen2(131072, dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0,
                                              original_max_position_embeddings=32768)),
    "yarn-betas": lambda: _llama(64, 65536, dict(rope_type="yarn", rope_theta=10000.0, factor=16.0,
                                                 original_max_position_embeddings=4096, beta_fast=16.0,
                                                 beta_slow=2.0)),
    "yarn-attention-factor": lambda: _llama(32, 16384, dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                            original_max_position_embeddings=2048,
                                                            attention_factor=0.8)),
    # DeepSeek-V3 / R1
    "yarn-deepseek-v3": lambda: _deepseek_v3(64, 163840, dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                                              original_max_position_embeddings=4096, beta_fast=32,
                                                              beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    # DeepSeek-V2-Lite style mscale values
    "yarn-deepseek-v2": lambda: _deepseek_v3(64, 163840, dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                                              original_max_position_embeddings=4096, beta_fast=32,
                                                              beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
    "yarn-mscale-differs": lambda: _deepseek_v3(32, 32768, dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                                original_max_position_embeddings=4096,
                                                                mscale=1.0, mscale_all_dim=0.5)),
    # transformers' truncate=False keeps the fractional correction range (gpt-oss style)
    "yarn-no-truncate": lambda: _llama(64, 131072, dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                                        original_max_position_embeddings=4096, beta_fast=32.0,
                                                        beta_slow=1.0, truncate=False)),
    "linear": lambda: _llama(64, 8192, dict(rope_type="linear", rope_theta=10000.0, factor=2.5)),
}


def _ours(cfg) -> tuple[torch.Tensor, float, int]:
    spec = spec_from_config(cfg.to_dict())
    dim = spec.mla.qk_rope_head_dim if spec.mla else spec.head_dim
    inv, scale = inv_freq_and_scale(spec.rope, dim, spec.max_position_embeddings)
    return inv, scale, dim


@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_scale_match_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = CASES[case]()
    rope_type = cfg.rope_parameters["rope_type"]
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, None)
    inv, scale, dim = _ours(cfg)
    assert inv.shape == ref_inv.shape == (dim // 2,)
    assert inv.dtype == torch.float32
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(float(ref_scale), rel=1e-9)
    # the cases exercise what they claim to
    base = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    if rope_type != "linear":
        assert torch.equal(inv[:1], base[:1])  # the highest frequency is never scaled
    assert not torch.allclose(inv, base)  # ... but the scaling does change something


def test_rotary_tables_match_transformers_module():
    """cos/sin tables (scale included) equal transformers' rotary module output."""
    import transformers as T

    cfg = CASES["yarn-deepseek-v3"]()
    hf = T.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding(cfg)
    spec = spec_from_config(cfg.to_dict())
    ours = RotaryEmbedding(spec.rope, spec.mla.qk_rope_head_dim, 4096, torch.float32)
    pos = torch.tensor([[0, 1, 7, 100, 1000, 4095]])
    cos, sin = hf(torch.zeros(1, 1, dtype=torch.float32), pos)
    half = spec.mla.qk_rope_head_dim // 2
    torch.testing.assert_close(ours.cos[pos[0]], cos[0, :, :half], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sin[pos[0]], sin[0, :, :half], rtol=1e-5, atol=1e-5)


def test_half_rotation_is_a_rotation():
    """Rotating by position p then reading back the pairs gives the angle p * inv_freq."""
    cfg = CASES["llama3-odd"]()
    spec = spec_from_config(cfg.to_dict())
    rot = RotaryEmbedding(spec.rope, spec.head_dim, 64, torch.float64)
    inv, _ = inv_freq_and_scale(spec.rope, spec.head_dim, spec.max_position_embeddings)
    half = spec.head_dim // 2
    x = torch.zeros(1, 1, spec.head_dim, dtype=torch.float64)
    x[..., :half] = 1.0  # each pair (i, i + half) starts at angle 0
    for p in (0, 3, 50):
        y = rot.apply(x, torch.tensor([p]))[0, 0]
        angle = torch.atan2(y[half:], y[:half])
        want = torch.remainder(p * inv.double() + torch.pi, 2 * torch.pi) - torch.pi
        torch.testing.assert_close(angle, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(y[:half] ** 2 + y[half:] ** 2, torch.ones(half, dtype=torch.float64))


@pytest.mark.parametrize("case", ["yarn-deepseek-v3", "yarn-deepseek-v2", "yarn-mscale-differs"])
def test_mla_softmax_scale_matches_transformers(case):
    import transformers as T

    from moeyard.attention.layers import mla_softmax_scale

    cfg = CASES[case]()
    hf = T.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention(cfg, 0)
    assert mla_softmax_scale(spec_from_config(cfg.to_dict())) == pytest.approx(hf.scaling, rel=1e-6)
