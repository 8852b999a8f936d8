"""moeyard.router_service.gate against transformers 5.23's own router modules.

Each family's router is built from a tiny transformers config, its weight is
copied into our pure functions, and both run on the same random tokens: the
chosen ids must be identical (order included) and the weights equal to 1e-6.
The gate config comes from ``moeyard.model.spec.spec_from_config(config.to_dict())``
so the spec -> gate path is checked too.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral.configuration_mixtral import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.olmoe.configuration_olmoe import OlmoeConfig  # noqa: E402
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter  # noqa: E402
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter  # noqa: E402
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter  # noqa: E402

from moeyard.model.spec import MoESpec, spec_from_config
from moeyard.router_service.gate import (
    GateConfig,
    apply_capacity,
    capacity_keep_mask,
    count_dropped,
    expert_capacity,
    gate,
    router_logits,
    select_experts,
)

HIDDEN = 32
TOKENS = 64
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
              intermediate_size=64, vocab_size=128)
DEEPSEEK = dict(COMMON, first_k_dense_replace=0, moe_intermediate_size=16, n_shared_experts=1,
                kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def _mixtral(**kw):
    c = MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2, **kw)
    return c, MixtralSparseMoeBlock(c).gate  # the router the Mixtral MoE block calls


def _qwen2(norm):
    c = Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16, norm_topk_prob=norm)
    return c, Qwen2MoeTopKRouter(c)


def _qwen3():
    c = Qwen3MoeConfig(**COMMON, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                       norm_topk_prob=True)
    return c, Qwen3MoeTopKRouter(c)


def _olmoe():
    c = OlmoeConfig(**COMMON, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False)
    return c, OlmoeTopKRouter(c)


def _dsv2(method, norm=False):
    c = DeepseekV2Config(**DEEPSEEK, n_routed_experts=16, num_experts_per_tok=3, topk_method=method,
                         n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=norm)
    return c, DeepseekV2TopkRouter(c)


def _dsv3():
    c = DeepseekV3Config(**DEEPSEEK, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, norm_topk_prob=True)
    return c, DeepseekV3MoE(c).gate  # DeepseekV3TopkRouter, as the MoE block uses it


def _init(router, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        if bias:
            router.e_score_correction_bias.copy_(0.1 * torch.randn(router.weight.shape[0], generator=g))
    return router


def _tokens(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.randn(TOKENS, HIDDEN, generator=g)).to(dtype)


CASES = {
    "mixtral": lambda: _mixtral(),
    "qwen2_moe_no_norm": lambda: _qwen2(False),
    "qwen2_moe_norm": lambda: _qwen2(True),
    "qwen3_moe": _qwen3,
    "olmoe": _olmoe,
    "deepseek_v2_greedy": lambda: _dsv2("greedy"),
    "deepseek_v2_group_limited_greedy": lambda: _dsv2("group_limited_greedy"),
    "deepseek_v3": _dsv3,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_transformers_router(case, seed):
    config, router = CASES[case]()
    is_v3 = case == "deepseek_v3"
    _init(router, seed, bias=is_v3)
    spec = spec_from_config(config.to_dict())
    cfg = GateConfig.from_spec(spec.moe, family=spec.family)
    x = _tokens(100 + seed)

    with torch.no_grad():
        ref_logits, ref_w, ref_ids = router(x)
    bias = router.e_score_correction_bias if is_v3 else None
    w, ids = gate(x, router.weight.detach(), cfg, correction_bias=bias)

    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert w.shape == ids.shape == (TOKENS, cfg.top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(router_logits(x, router.weight.detach(), cfg), ref_logits, atol=0, rtol=0)


def test_deepseek_v3_bias_only_chooses():
    """Bias moves the choice, but the weights are unbiased sigmoid scores."""
    config, router = _dsv3()
    _init(router, 3)
    cfg = GateConfig.from_spec(spec_from_config(config.to_dict()).moe)
    assert (cfg.scoring, cfg.topk_method, cfg.router_logits_fp32) == ("sigmoid", "noaux_tc", True)
    logits = router_logits(_tokens(4), router.weight.detach(), cfg)
    bias = torch.zeros(16)
    bias[5] = 10.0  # expert 5 always chosen, weight still its own score
    w, ids = select_experts(logits, cfg, bias)
    assert (ids == 5).any(dim=-1).all()
    raw = torch.sigmoid(logits).gather(1, ids)
    torch.testing.assert_close(w, 2.5 * raw / raw.sum(-1, keepdim=True), atol=1e-6, rtol=0)
    # chosen experts come from at most topk_group groups
    for row in (ids // cfg.experts_per_group):
        assert len(set(row.tolist())) <= cfg.topk_group


def test_deepseek_v2_norm_topk_prob_ignored_like_transformers():
    config, router = _dsv2("group_limited_greedy", norm=True)
    _init(router, 5)
    spec = spec_from_config(config.to_dict())
    assert config.norm_topk_prob and not spec.moe.norm_topk_prob  # the spec applies the quirk
    cfg = GateConfig.from_spec(spec.moe, family="deepseek_v2")
    x = _tokens(6)
    with torch.no_grad():
        _, ref_w, ref_ids = router(x)
    w, ids = gate(x, router.weight.detach(), cfg)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_bf16_router(case):
    """bf16 model: logits in bf16 as transformers; ids identical, weights fp32 (qwen's are bf16)."""
    config, router = CASES[case]()
    _init(router, 7)
    router.to(torch.bfloat16)
    cfg = GateConfig.from_spec(spec_from_config(config.to_dict()).moe)
    x = _tokens(8, torch.bfloat16)
    with torch.no_grad():
        ref_logits, ref_w, ref_ids = router(x)
    logits = router_logits(x, router.weight.detach(), cfg)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref_logits)
    w, ids = select_experts(logits, cfg)
    assert torch.equal(ids, ref_ids)
    assert w.dtype == torch.float32
    assert ref_w.dtype == (torch.float32 if case == "mixtral" else torch.bfloat16)
    torch.testing.assert_close(w.to(ref_w.dtype), ref_w, atol=0, rtol=0)


# -- top-k override --------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 8])
def test_top_k_override(k):
    moe = MoESpec(num_experts=8, top_k=2, intermediate_size=16, norm_topk_prob=True)
    cfg = GateConfig.from_spec(moe, top_k_override=k)
    assert cfg.top_k == k
    logits = torch.randn(TOKENS, 8, generator=torch.Generator().manual_seed(k))
    w, ids = select_experts(logits, cfg)
    assert w.shape == ids.shape == (TOKENS, k)
    torch.testing.assert_close(w.sum(-1), torch.ones(TOKENS), atol=1e-6, rtol=0)
    assert (ids.sort(-1)[0].diff(dim=-1) > 0).all()  # distinct experts
    assert (w[:, :-1] >= w[:, 1:]).all()  # descending
    ref = torch.softmax(logits, -1).topk(k, -1)
    assert torch.equal(ids, ref.indices)
    # without renormalisation the weights are the raw softmax probabilities
    raw = GateConfig.from_spec(MoESpec(num_experts=8, top_k=2, intermediate_size=16), top_k_override=k)
    w_raw, _ = select_experts(logits, raw)
    torch.testing.assert_close(w_raw, ref.values, atol=1e-6, rtol=0)


def test_top_k_override_deepseek_v3_group_limit():
    moe = MoESpec(num_experts=16, top_k=4, intermediate_size=16, scoring="sigmoid", norm_topk_prob=True,
                  topk_method="noaux_tc", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  router_logits_fp32=True, has_correction_bias=True)
    cfg = GateConfig.from_spec(moe, top_k_override=8)  # 2 groups * 4 experts: the maximum
    logits = torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(1))
    w, ids = select_experts(logits, cfg, torch.zeros(16))
    assert ids.shape == (TOKENS, 8)
    torch.testing.assert_close(w.sum(-1), torch.full((TOKENS,), 2.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"top_k_override \(9\).*topk_group \(2\) \* experts per group \(4\)"):
        GateConfig.from_spec(moe, top_k_override=9)


@pytest.mark.parametrize("k", [0, -1, 9])
def test_invalid_top_k_override(k):
    moe = MoESpec(num_experts=8, top_k=2, intermediate_size=16)
    with pytest.raises(ValueError, match=rf"top_k_override \({k}\) must be in \[1, num_experts=8\]"):
        GateConfig.from_spec(moe, top_k_override=k)


@pytest.mark.parametrize("cf", [0, -0.5, float("nan"), float("inf")])
def test_invalid_capacity_factor(cf):
    moe = MoESpec(num_experts=8, top_k=2, intermediate_size=16)
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        GateConfig.from_spec(moe, capacity_factor=cf)
    with pytest.raises(ValueError, match="capacity_factor"):
        GateConfig(num_experts=8, top_k=2, capacity_factor=cf)


def test_invalid_direct_configs():
    with pytest.raises(ValueError, match="top_k must be in"):
        GateConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="divisible by n_group"):
        GateConfig(num_experts=10, top_k=2, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="topk_group must be in"):
        GateConfig(num_experts=16, top_k=2, topk_method="noaux_tc", n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="top-2"):
        GateConfig(num_experts=4, top_k=2, topk_method="noaux_tc", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="only used by topk_method='noaux_tc'"):
        select_experts(torch.zeros(2, 4), GateConfig(num_experts=4, top_k=2), torch.zeros(4))


# -- capacity ----------------------------------------------------------------------------

def test_capacity_hand_checked():
    # T=4, A=2, E=4, factor 1.0 -> C = ceil(1.0 * 4 * 2 / 4) = 2
    ids = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 3]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    assert expert_capacity(4, 2, 4, 1.0) == 2
    w2, ids2 = apply_capacity(w, ids, 4, 1.0)
    # expert 0 is asked by tokens 0, 1, 2 (slot 1), 3: tokens 2 and 3 overflow
    expected = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.0], [0.0, 0.1]])
    assert torch.equal(w2, expected)
    assert torch.equal(ids2, ids)  # ids are kept
    assert count_dropped(ids, 4, 1.0) == 2
    # factor 1.5 -> C = 3: only token 3's expert-0 assignment overflows
    w3, _ = apply_capacity(w, ids, 4, 1.5)
    assert torch.equal(w3, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.0, 0.1]]))
    # token order wins over rank: expert 1 at slot 1 of token 0 beats slot 0 of token 2
    ids_b = torch.tensor([[2, 1], [1, 3], [1, 0]])
    keep = capacity_keep_mask(ids_b, 4, 1)
    assert keep.tolist() == [[True, True], [False, True], [False, True]]


def test_capacity_rounding():
    assert expert_capacity(10, 2, 2, 1.1) == 11
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(3, 2, 4, 1.0) == 2


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0])
def test_capacity_invariants(cf):
    e, k = 8, 2
    g = torch.Generator().manual_seed(int(cf * 100))
    logits = torch.randn(TOKENS * 4, e, generator=g)
    logits[:, 0] += 2.0  # make expert 0 popular so it overflows
    cfg = GateConfig(num_experts=e, top_k=k, norm_topk_prob=True, capacity_factor=cf)
    w0, ids0 = select_experts(logits, cfg)
    w, ids = apply_capacity(w0, ids0, e, cf)
    assert torch.equal(ids, ids0)
    cap = math.ceil(cf * logits.shape[0] * k / e)
    kept = w > 0
    per_expert = torch.bincount(ids[kept], minlength=e)
    assert per_expert.max() <= cap
    # dropped entries are exactly zero, kept ones unchanged (no renormalisation)
    assert torch.equal(w[kept], w0[kept])
    dropped = int((~kept).sum())
    assert dropped == count_dropped(ids0, e, cf)
    # an expert that drops anything is full, and its kept assignments are the earliest ones
    for ex in range(e):
        pos = (ids0 == ex).reshape(-1).nonzero().squeeze(-1)  # flat row-major positions
        kept_ex = kept.reshape(-1)[pos]
        if (~kept_ex).any():
            assert int(kept_ex.sum()) == cap
        assert torch.equal(kept_ex, torch.arange(len(pos)) < cap)
    if cf <= 1.0:
        assert dropped > 0


def test_capacity_none_is_noop_and_gate_applies_it():
    moe = MoESpec(num_experts=8, top_k=2, intermediate_size=16, norm_topk_prob=True)
    weight = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(9))
    weight[0] += 1.0
    x = _tokens(10)
    cfg = GateConfig.from_spec(moe)
    assert cfg.capacity_factor is None
    w, ids = gate(x, weight, cfg)
    w_ref, ids_ref = select_experts(router_logits(x, weight, cfg), cfg)
    assert torch.equal(w, w_ref) and torch.equal(ids, ids_ref)
    cfg_c = GateConfig.from_spec(moe, capacity_factor=0.5)
    w_c, ids_c = gate(x, weight, cfg_c)
    assert torch.equal(ids_c, ids)
    assert torch.equal(w_c, apply_capacity(w, ids, 8, 0.5)[0])
    assert (w_c == 0).any()
