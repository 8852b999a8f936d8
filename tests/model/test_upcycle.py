"""Sparse upcycling (``copy``): the MoE computes exactly the dense function, whatever the router.

Dense Llama and Qwen2 checkpoints made with ``transformers`` (odd sizes, several layers) are upcycled
with a random and a k-means router; the in-process engine on the MoE, and ``transformers`` loading the
MoE, give the dense model's greedy tokens (fp32)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.ffn_capture import ffn_inputs
from moeyard.attention.sequence import SamplingParams
from moeyard.model.spec import load_spec
from moeyard.model.upcycle import UpcycleError, UpcycleOptions, kmeans_rows, upcycle
from tests.conftest import save_hf_model

PROMPTS = [[5, 17, 99, 150, 3, 42], [7, 8, 9], [100, 101, 102, 103, 104, 105, 106, 107]]
NEW = 12
CALIB = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(5)).tolist()


def _dense_models(tmp_path_factory, name: str, intermediate: int) -> dict:
    """family -> (dense checkpoint dir, transformers model): three layers, hidden 48, FFN ``intermediate``."""
    out = {}
    for family in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"{name}_{family}")
        extra = {"layer_types": ["full_attention"] * 3} if family == "qwen2" else {}
        out[family] = (d, save_hf_model(family, d, num_hidden_layers=3, intermediate_size=intermediate,
                                        hidden_size=48, num_attention_heads=3, num_key_value_heads=1, **extra))
    return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Odd sizes (FFN 88)."""
    return _dense_models(tmp_path_factory, "dense", 88)


def _hf_greedy(model, prompt):
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("router", ["random", "kmeans"])
@pytest.mark.parametrize("family, moe_family", [("llama", "mixtral"), ("qwen2", "qwen2_moe")])
def test_copy_upcycled_moe_gives_the_dense_tokens(dense, tmp_path, family, moe_family, router):
    import transformers

    ckpt, model = dense[family]
    out = upcycle(ckpt, tmp_path / "moe", UpcycleOptions(experts=5, top_k=2, router=router, seed=3),
                  calib_inputs=lambda: ffn_inputs(ckpt, CALIB))
    spec = load_spec(out)
    assert spec.family == moe_family and spec.moe.num_experts == 5 and spec.moe.top_k == 2
    assert spec.num_moe_layers == 3 and spec.moe.intermediate_size == 88
    want = [_hf_greedy(model, p) for p in PROMPTS]
    engine = LLMEngine(out, EngineConfig(dtype="float32"))
    assert engine.generate(PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=True)) == want
    moe = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # loadable by transformers
    assert type(moe).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[moe_family]
    assert [_hf_greedy(moe, p) for p in PROMPTS] == want


def test_kmeans_router_rows_are_centroids_of_the_calibration_inputs(dense, tmp_path):
    from safetensors.torch import load_file

    ckpt, _ = dense["llama"]
    out = upcycle(ckpt, tmp_path / "moe", UpcycleOptions(experts=4, top_k=1, router="kmeans"),
                  calib_inputs=lambda: ffn_inputs(ckpt, CALIB))
    router = load_file(str(out / "model.safetensors"))["model.layers.1.block_sparse_moe.gate.weight"]
    assert router.shape == (4, 48)
    assert torch.allclose(router.norm(dim=1), torch.full((4,), 4.0), atol=1e-4)  # unit centroids x scale
    # the calibration tokens spread over the experts unevenly, as clusters of real inputs do
    x = torch.nn.functional.normalize(ffn_inputs(ckpt, CALIB)[1], dim=1)
    counts = torch.bincount((x @ router.T).argmax(dim=1), minlength=4)
    assert int(counts.sum()) >= 390 and bool((counts > 0).all())


def test_upcycle_shows_progress_on_request(dense, tmp_path, capfd):
    ckpt, _ = dense["llama"]
    upcycle(ckpt, tmp_path / "moe", UpcycleOptions(experts=2, top_k=1), progress=True)
    out, err = capfd.readouterr()
    assert "upcycling" in err and "3/3" in err and out == ""


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    x = torch.cat([d + 0.05 * torch.randn(50, 16, generator=g) for d in dirs])
    c = kmeans_rows(x, 3, seed=1)
    sims = c @ dirs.T  # each true direction has a centroid close to it
    assert bool((sims.max(dim=0).values > 0.99).all())


@pytest.mark.parametrize("opts, message", [
    (UpcycleOptions(experts=0, top_k=1), "--experts must be in"),
    (UpcycleOptions(experts=4, top_k=5), "--top-k must be in [1, --experts = 4]"),
    (UpcycleOptions(experts=4, top_k=2, mode="shuffle"), "--mode 'shuffle' is not supported"),
    (UpcycleOptions(experts=4, top_k=2, router="hash"), "--router 'hash' is not supported"),
])
def test_bad_options_are_named_and_nothing_is_written(dense, tmp_path, opts, message):
    ckpt, _ = dense["llama"]
    with pytest.raises(UpcycleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        upcycle(ckpt, tmp_path / "moe", opts, calib_inputs=lambda: ffn_inputs(ckpt, CALIB))
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_named(dense, tmp_path, hf_models):
    ckpt, _ = dense["llama"]
    moe_ckpt, _ = hf_models("mixtral")
    with pytest.raises(UpcycleError, match="model_type 'mixtral' cannot be upcycled"):
        upcycle(moe_ckpt, tmp_path / "a", UpcycleOptions(experts=4, top_k=2))
    with pytest.raises(UpcycleError, match="fewer than --experts = 4"):
        upcycle(ckpt, tmp_path / "b", UpcycleOptions(experts=4, top_k=2, router="kmeans"),
                calib_inputs=lambda: ffn_inputs(ckpt, [5, 6]))
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "c").mkdir()
    with pytest.raises(UpcycleError, match="already exists"):
        upcycle(ckpt, tmp_path / "c", UpcycleOptions(experts=4, top_k=2))


def test_upcycle_cli(dense, tmp_path):
    ckpt, _ = dense["llama"]
    exe = Path(sys.executable).with_name("moeyard")
    r = subprocess.run([str(exe), "upcycle", "--dense", str(ckpt), "--out", str(tmp_path / "moe"), "--experts", "3",
                        "--top-k", "2", "--seed", "7"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["num_local_experts"] == 3
    r = subprocess.run([str(exe), "upcycle", "--dense", str(ckpt), "--out", str(tmp_path / "bad"), "--experts", "3",
                        "--top-k", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--top-k must be in [1, --experts = 3], got 4" in r.stderr


# -- split (MoEfication / DS-MoE): the FFN's neurons partitioned into experts ------------------------------

@pytest.fixture(scope="module")
def dense96(tmp_path_factory):
    """Dense checkpoints whose FFN width (96) splits into 4 experts of 24 (strides of 16 bytes for
    transformers' grouped GEMM)."""
    return _dense_models(tmp_path_factory, "dense96", 96)


def _nll(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_with_every_expert_active_gives_the_dense_tokens(dense96, tmp_path, family):
    import transformers

    ckpt, model = dense96[family]
    out = upcycle(ckpt, tmp_path / "moe", UpcycleOptions(experts=4, top_k=4, mode="split"),
                  calib_inputs=lambda: ffn_inputs(ckpt, CALIB))
    spec = load_spec(out)
    assert spec.family == "qwen2_moe" and spec.moe.intermediate_size == 24 and spec.moe.num_experts == 4
    want = [_hf_greedy(model, p) for p in PROMPTS]
    assert LLMEngine(out, EngineConfig(dtype="float32")).generate(
        PROMPTS, SamplingParams(max_tokens=NEW, ignore_eos=True)) == want
    moe = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert [_hf_greedy(moe, p) for p in PROMPTS] == want


def test_split_partitions_the_neurons_and_sparse_top_k_runs(dense96, tmp_path, capsys):
    import transformers
    from safetensors.torch import load_file

    ckpt, model = dense96["llama"]
    held_out = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(9)).tolist()
    dense_nll = _nll(model, held_out)
    nll = {}
    for k in (4, 2, 1):
        out = upcycle(ckpt, tmp_path / f"k{k}", UpcycleOptions(experts=4, top_k=k, mode="split"),
                      calib_inputs=lambda: ffn_inputs(ckpt, CALIB))
        nll[k] = _nll(transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), held_out)
        assert LLMEngine(out, EngineConfig(dtype="float32")).generate(
            PROMPTS[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # the sparse MoE serves
    # the experts of a layer are the dense FFN's neurons, each once, in equal groups
    tensors = load_file(str(tmp_path / "k2" / "model.safetensors"))
    gate = torch.cat([tensors[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] for e in range(4)])
    dense_gate = load_file(str(ckpt / "model.safetensors"))["model.layers.1.mlp.gate_proj.weight"]
    assert gate.shape == dense_gate.shape
    assert sorted(map(tuple, gate.tolist())) == sorted(map(tuple, dense_gate.tolist()))
    assert abs(nll[4] - dense_nll) < 1e-4 * max(1.0, dense_nll)  # every expert active: the dense model
    assert all(math.isfinite(v) for v in nll.values())  # how much k < E costs is reported, not asserted
    print(f"dense nll {dense_nll:.4f}; split top-4 {nll[4]:.4f}, top-2 {nll[2]:.4f}, top-1 {nll[1]:.4f}")


def test_split_needs_experts_that_divide_the_ffn(dense96, tmp_path):
    ckpt, _ = dense96["llama"]
    with pytest.raises(UpcycleError, match="--experts 5 does not divide the FFN width 96"):
        upcycle(ckpt, tmp_path / "a", UpcycleOptions(experts=5, top_k=5, mode="split"),
                calib_inputs=lambda: ffn_inputs(ckpt, CALIB))
    with pytest.raises(UpcycleError, match="--mode split needs calibration text"):
        upcycle(ckpt, tmp_path / "b", UpcycleOptions(experts=4, top_k=4, mode="split"))
    assert not list(tmp_path.iterdir())
