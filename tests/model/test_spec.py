"""ModelSpec parsing: every family's config, MoE layer selection, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from moeyard.model.spec import SpecError, load_spec, spec_from_config
from tests.conftest import FAMILIES, hf_config


def _cfg(family: str, **over):
    """``hf_config`` with overrides; keeps per-layer lists consistent with the layer count."""
    cfg = hf_config(family, **over)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    return cfg


def _hf_moe_layers(cfg) -> tuple[int, ...]:
    """Decoder layers that transformers itself builds with routed experts (the reference)."""
    import transformers as T

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    return tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_config_parses(family):
    cfg = hf_config(family)
    spec = spec_from_config(cfg.to_dict())
    assert spec.family == family
    assert spec.vocab_size == cfg.vocab_size
    assert spec.hidden_size == cfg.hidden_size
    assert spec.num_layers == cfg.num_hidden_layers
    assert spec.num_heads == cfg.num_attention_heads
    assert spec.num_kv_heads == cfg.num_key_value_heads
    assert spec.rms_norm_eps == cfg.rms_norm_eps
    assert spec.max_position_embeddings == cfg.max_position_embeddings
    assert spec.eos_token_ids == (2,)
    assert spec.bos_token_id == 1
    assert spec.tie_word_embeddings is False
    assert spec.rope.rope_type == "default"
    assert spec.rope.theta == cfg.rope_parameters["rope_theta"]
    if family == "qwen3_moe":
        assert spec.head_dim == 32  # explicit head_dim != hidden / heads
    elif spec.mla is None:
        assert spec.head_dim == cfg.hidden_size // cfg.num_attention_heads
    if family in ("llama", "qwen2"):
        assert spec.moe is None and spec.moe_layers == ()
        return
    assert spec.moe is not None
    assert spec.moe.num_experts == 8
    assert spec.moe.top_k == 2
    assert spec.moe_layers == _hf_moe_layers(cfg)
    assert spec.is_moe_layer == tuple(i in spec.moe_layers for i in range(spec.num_layers))
    assert [spec.moe_index(layer) for layer in spec.moe_layers] == list(range(spec.num_moe_layers))


def test_family_specific_fields():
    ds2 = spec_from_config(hf_config("deepseek_v2").to_dict())
    assert ds2.mla is not None and ds2.mla.q_lora_rank is None
    assert (ds2.mla.kv_lora_rank, ds2.mla.qk_nope_head_dim, ds2.mla.qk_rope_head_dim, ds2.mla.v_head_dim) \
        == (32, 16, 8, 16)
    assert ds2.moe.topk_method == "group_limited_greedy"
    assert (ds2.moe.n_group, ds2.moe.topk_group) == (4, 2)
    assert ds2.moe.routed_scaling_factor == 1.5
    assert ds2.moe.shared_intermediate_size == 48  # 1 shared expert x moe_intermediate_size
    assert ds2.moe.scoring == "softmax"

    ds3 = spec_from_config(hf_config("deepseek_v3").to_dict())
    assert ds3.mla.q_lora_rank == 48
    assert ds3.moe.scoring == "sigmoid" and ds3.moe.topk_method == "noaux_tc"
    assert ds3.moe.has_correction_bias and ds3.moe.norm_topk_prob
    assert ds3.moe.routed_scaling_factor == 2.5

    q2 = spec_from_config(hf_config("qwen2_moe").to_dict())
    assert q2.moe.shared_intermediate_size == 80 and q2.moe.shared_expert_gated
    assert q2.moe.intermediate_size == 48 and q2.dense_intermediate_size == 128
    assert q2.qkv_bias

    q3 = spec_from_config(hf_config("qwen3_moe").to_dict())
    assert q3.qk_norm == "per_head" and q3.moe.norm_topk_prob

    ol = spec_from_config(hf_config("olmoe").to_dict())
    assert ol.qk_norm == "full" and ol.clip_qkv == 8.0

    mx = spec_from_config(hf_config("mixtral").to_dict())
    assert mx.moe.norm_topk_prob and mx.moe.intermediate_size == 96


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("first_dense", [0, 1, 3])
def test_first_k_dense_replace(family, first_dense):
    cfg = _cfg(family, num_hidden_layers=4, first_k_dense_replace=first_dense)
    spec = spec_from_config(cfg.to_dict())
    assert spec.moe_layers == tuple(range(first_dense, 4))
    assert spec.moe_layers == _hf_moe_layers(cfg)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("step,mlp_only", [(1, []), (1, [0, 3]), (2, []), (2, [3]), (3, [0, 5])])
def test_mlp_only_layers_and_sparse_step(family, step, mlp_only):
    cfg = _cfg(family, num_hidden_layers=6, decoder_sparse_step=step, mlp_only_layers=mlp_only)
    spec = spec_from_config(cfg.to_dict())
    expected = tuple(i for i in range(6) if i not in mlp_only and (i + 1) % step == 0)
    assert spec.moe_layers == expected
    assert spec.moe_layers == _hf_moe_layers(cfg)


def test_all_layers_dense_means_no_moe():
    cfg = _cfg("qwen3_moe", num_hidden_layers=2, mlp_only_layers=[0, 1])
    spec = spec_from_config(cfg.to_dict())
    assert spec.moe is None and spec.moe_layers == ()


def test_unsupported_model_type_lists_supported_families():
    cfg = hf_config("llama").to_dict()
    cfg["model_type"] = "gpt_neox"
    with pytest.raises(SpecError) as ei:
        spec_from_config(cfg)
    msg = str(ei.value)
    assert "gpt_neox" in msg
    for family in FAMILIES:
        assert family in msg


@pytest.mark.parametrize("qc", [{"quant_method": "fp8", "fmt": "e4m3"}, {"quant_method": "gptq", "bits": 4}])
def test_quantization_config_is_refused_by_name(qc):
    cfg = hf_config("mixtral").to_dict()
    cfg["quantization_config"] = qc
    with pytest.raises(SpecError) as ei:
        spec_from_config(cfg)
    msg = str(ei.value)
    assert "quantization_config" in msg
    assert qc["quant_method"] in msg


def test_missing_config_json(tmp_path):
    with pytest.raises(SpecError) as ei:
        load_spec(tmp_path)
    assert "config.json" in str(ei.value)
    assert str(tmp_path) in str(ei.value)


def test_invalid_json_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(tmp_path)


def test_missing_required_field_is_named():
    cfg = hf_config("mixtral").to_dict()
    del cfg["num_local_experts"]
    with pytest.raises(SpecError, match="num_local_experts"):
        spec_from_config(cfg)


def test_load_spec_reads_saved_config(tmp_path):
    cfg = hf_config("deepseek_v3")
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert load_spec(tmp_path) == spec_from_config(cfg.to_dict())
