"""moeyard.model.economics: parameter counts from checkpoint headers, checked against transformers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.economics import dense_equivalent, economics, is_routed_expert_tensor
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions
from moeyard.model.make_model_tensors import tensor_plan
from moeyard.model.spec import load_spec
from moeyard.model.weight_names import (
    expert_names,
    router_weight_name,
    shared_expert_gate_name,
    shared_expert_names,
)
from tests.conftest import FAMILIES, save_hf_model

MOE_FAMILIES = [f for f in FAMILIES if f not in ("llama", "qwen2")]
DENSE_FAMILIES = ["llama", "qwen2"]


def _load(d):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _stored_param_count(model) -> int:
    """What a transformers model writes to its checkpoint, counted from the model.

    ``num_parameters()`` counts each parameter once (a tied ``lm_head`` shares the
    embedding's parameter and ``save_pretrained`` stores that tensor once, so tying
    needs no correction). It leaves out buffers, but persistent buffers are stored:
    DeepSeek-V3's ``gate.e_score_correction_bias`` (a buffer in transformers, a
    tensor in the checkpoint) is the one such buffer here.
    """
    state = model.state_dict()
    persistent = sum(b.numel() for n, b in model.named_buffers() if n in state)
    return model.num_parameters() + persistent


def _routed_from_model(model) -> int:
    """Routed-expert parameters by transformers' own names.

    transformers 5.23 holds each MoE layer's routed experts as fused 3-D parameters
    ``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2I, H] and ``...experts.down_proj``
    [E, H, I] (Mixtral's ``block_sparse_moe`` is renamed ``mlp``); shared experts are
    ``mlp.shared_expert.*`` / ``mlp.shared_experts.*`` and never match ``.mlp.experts.``.
    """
    return sum(p.numel() for n, p in model.named_parameters()
               if ".mlp.experts." in n and "shared_expert" not in n)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_matches_transformers(family, hf_models):
    d, _ = hf_models(family)
    econ = economics(d)
    model = _load(d)
    cfg = model.config

    total = _stored_param_count(model)
    assert econ.total_params == total
    if family != "deepseek_v3":
        assert econ.total_params == model.num_parameters()

    routed = _routed_from_model(model)
    n_exp = cfg.num_local_experts if family == "mixtral" else (
        cfg.n_routed_experts if family.startswith("deepseek") else cfg.num_experts)
    top_k = cfg.num_experts_per_tok
    fused = [p for n, p in model.named_parameters() if n.endswith(".mlp.experts.gate_up_proj")]
    assert fused and all(p.shape[0] == n_exp for p in fused)
    assert routed > 0 and routed % n_exp == 0
    assert econ.routed_expert_params == routed
    assert econ.active_params == total - routed + routed // n_exp * top_k
    assert econ.active_params < econ.total_params

    spec = load_spec(d)
    assert (econ.family, econ.num_layers, econ.num_moe_layers) == (family, cfg.num_hidden_layers,
                                                                    len(spec.moe_layers))
    assert econ.num_moe_layers == len(fused)
    assert (econ.num_experts, econ.top_k) == (n_exp, top_k)
    assert econ.bytes_per_param == 4  # the fixture saves float32
    assert econ.dense_equivalent_params == pytest.approx(total / (n_exp ** 0.44 / top_k ** 0.63), rel=1e-12)


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_dense_family_matches_transformers(family, hf_models):
    d, _ = hf_models(family)
    econ = economics(d)
    model = _load(d)
    assert econ.total_params == model.num_parameters() == _stored_param_count(model)
    assert econ.active_params == econ.total_params
    assert econ.routed_expert_params == 0
    assert (econ.num_experts, econ.top_k, econ.num_moe_layers) == (0, 0, 0)
    assert econ.dense_equivalent_params == econ.total_params
    assert econ.num_layers == model.config.num_hidden_layers
    assert econ.bytes_per_param == 4


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_tied_embeddings(family, tmp_path):
    """Tied: save_pretrained stores only the embedding and transformers counts it once."""
    save_hf_model(family, tmp_path, tie_word_embeddings=True)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = _load(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    econ = economics(tmp_path)
    assert econ.total_params == model.num_parameters()
    routed = _routed_from_model(model)
    assert econ.routed_expert_params == routed
    if routed:
        assert econ.active_params == econ.total_params - routed + routed // 8 * 2


def test_tied_checkpoint_with_redundant_head_counts_it_once(hf_models, tmp_path):
    """A tied checkpoint that still stores ``lm_head.weight``: transformers ties it to the
    embedding (one parameter), and so does the count."""
    src, _ = hf_models("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    stored = sum(t.numel() for t in tensors.values())
    econ = economics(tmp_path)
    assert econ.total_params == stored - tensors["lm_head.weight"].numel()
    assert econ.total_params == _load(tmp_path).num_parameters()


def test_routed_predicate_excludes_shared_experts():
    for fam in MOE_FAMILIES:
        for layer in (0, 3):
            for e in (0, 7, 12):
                for n in (expert_names(fam, layer, e).gate, expert_names(fam, layer, e).up,
                          expert_names(fam, layer, e).down):
                    assert is_routed_expert_tensor(n), n
            assert not is_routed_expert_tensor(router_weight_name(fam, layer))
            assert not is_routed_expert_tensor(f"model.layers.{layer}.mlp.gate.e_score_correction_bias")
    for fam in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
        s = shared_expert_names(fam, 2)
        for n in (s.gate, s.up, s.down):
            assert not is_routed_expert_tensor(n), n
    assert not is_routed_expert_tensor(shared_expert_gate_name(2))
    # fused layouts
    assert is_routed_expert_tensor("model.layers.1.mlp.experts.gate_up_proj")
    assert is_routed_expert_tensor("model.layers.1.mlp.experts.down_proj")


def test_fused_expert_checkpoint(hf_models, tmp_path):
    """A checkpoint with fused [E, ...] expert tensors (transformers' in-memory layout) counts the same."""
    src, _ = hf_models("qwen3_moe")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    model = _load(src)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert economics(tmp_path) == economics(src)


def test_make_model_mixtral_per_expert(tmp_path):
    opts = MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=96, experts=8, top_k=2,
                            vocab=320, dtype="bfloat16")
    d = make_model(opts, tmp_path / "mixtral")
    names = CheckpointReader(d).names()
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in names

    econ = economics(d)
    plan = tensor_plan(opts)
    total = sum(math.prod(t.shape) for t in plan)
    routed = sum(math.prod(t.shape) for t in plan if ".experts." in t.name)
    assert routed == 2 * 8 * 3 * 64 * 96
    assert econ.total_params == total
    assert econ.routed_expert_params == routed
    assert econ.active_params == total - routed + routed * 2 // 8
    # the spec's closed form (no biases in Mixtral) agrees exactly
    assert (econ.total_params, econ.active_params) == load_spec(d).total_and_active_params()
    assert econ.total_params == _load(d).num_parameters()
    assert (econ.family, econ.num_layers, econ.num_moe_layers, econ.num_experts, econ.top_k) == (
        "mixtral", 2, 2, 8, 2)
    assert econ.bytes_per_param == 2
    assert econ.dense_equivalent_params == pytest.approx(total / (8 ** 0.44 / 2 ** 0.63))

    # the same checkpoint in shards gives the same numbers
    sharded = make_model(MakeModelOptions(**{**opts.__dict__, "max_shard_bytes": 64 << 10}), tmp_path / "sharded")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert economics(sharded) == econ


def test_make_model_deepseek_v3_mixed_dtypes(tmp_path):
    """bf16 weights plus a float32 correction bias: the dominant dtype (by parameters) is bf16."""
    opts = MakeModelOptions(family="deepseek_v3", layers=3, vocab=320, dtype="bfloat16")
    d = make_model(opts, tmp_path / "v3")
    econ = economics(d)
    assert econ.bytes_per_param == 2
    assert econ.num_moe_layers == 2  # first layer dense
    plan = tensor_plan(opts)
    assert econ.total_params == sum(math.prod(t.shape) for t in plan)
    routed = sum(math.prod(t.shape) for t in plan if ".experts." in t.name and "shared" not in t.name)
    assert econ.routed_expert_params == routed
    assert econ.active_params == econ.total_params - routed + routed * opts.top_k // opts.experts


def test_dense_equivalent():
    assert dense_equivalent(46.7e9, 8, 2) == pytest.approx(46.7e9 / (8 ** 0.44 / 2 ** 0.63), rel=1e-12)
    assert 46.7e9 / 1.7 < dense_equivalent(46.7e9, 8, 2) < 46.7e9 / 1.5
    assert dense_equivalent(1e9, 0, 0) == 1e9
    assert dense_equivalent(1e9, 1, 1) == pytest.approx(1e9)
    assert dense_equivalent(0, 0, 0) == 0.0


@pytest.mark.parametrize("args", [(1e9, 8, 9), (1e9, 0, 1), (1e9, 8, 0), (0, 8, 2), (-1.0, 8, 2),
                                  (1e9, -8, 2), (1e9, 8, -1), (math.inf, 8, 2), (math.nan, 0, 0)])
def test_dense_equivalent_rejects(args):
    with pytest.raises(ValueError):
        dense_equivalent(*args)


def test_a_served_top_k_changes_the_active_count(hf_models):
    """A deployment's ``moe_top_k``: active and dense-equivalent counts follow it, the checkpoint's stays."""
    ckpt, _ = hf_models("mixtral")
    base, one = economics(ckpt), economics(ckpt, top_k=1)
    assert (base.top_k, base.checkpoint_top_k, one.top_k, one.checkpoint_top_k) == (2, 2, 1, 2)
    assert one.total_params == base.total_params
    per_expert_all_layers = base.routed_expert_params // base.num_experts
    assert base.active_params - one.active_params == per_expert_all_layers      # one expert fewer per layer
    assert one.dense_equivalent_params == dense_equivalent(base.total_params, 8, 1)
    assert economics(ckpt, top_k=2) == base
    with pytest.raises(ValueError, match=r"top_k 9 must be in \[1, 8\]"):
        economics(ckpt, top_k=9)
