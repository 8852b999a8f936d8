"""``moeyard.model.make_model`` writes hub-layout random checkpoints that transformers loads exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers  # noqa: E402  (the test extra installs it: the reference oracle)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeyard.model.make_model import main, make_model
from moeyard.model.make_model_config import build_config
from moeyard.model.make_model_options import MakeModelOptions
from moeyard.model.make_model_tensors import init_tensor, routing_subspace_dims, tensor_plan
from moeyard.model.spec import SUPPORTED_FAMILIES, load_spec, spec_from_config
from moeyard.model.tokenizer_builder import BOS_ID, EOS_ID, UNK_ID, build_tokenizer

transformers.logging.set_verbosity_error()

TINY = dict(layers=3, hidden=64, intermediate=128, experts=8, top_k=2, heads=4, kv_heads=2, vocab=300,
            dtype="float32")
MOE_FAMILIES = tuple(f for f in SUPPORTED_FAMILIES if f not in ("llama", "qwen2"))


# -- helpers ------------------------------------------------------------------------------

def read_checkpoint(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("model*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(f)
        assert not set(part) & set(out), "a tensor is stored twice"
        out.update(part)
    return out


_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def expected_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The hub tensors as transformers 5.23 holds them in memory: Mixtral's ``block_sparse_moe`` is
    renamed ``mlp``, per-expert matrices are fused into ``experts.gate_up_proj`` ([E, 2I, H], gate
    rows first) and ``experts.down_proj`` ([E, H, I])."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[_ROLE[m[3]]] = t
        else:
            out[name] = t
    for prefix, per in experts.items():
        ids = sorted(per)
        assert ids == list(range(len(ids)))
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate"], per[e]["up"]]) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([per[e]["down"] for e in ids])
    return out


def load_hf(d: Path, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True, **kw)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    return model.eval()


def assert_params_equal(model, tensors: dict[str, torch.Tensor]) -> None:
    want = expected_state_dict(tensors)
    have = model.state_dict()
    assert set(have) == set(want)
    for name, t in want.items():
        assert have[name].shape == t.shape, name
        assert have[name].dtype == t.dtype, name
        assert torch.equal(have[name], t), name


def expert_load(model, n_experts: int, n_seqs: int = 64, seq: int = 64, vocab: int = 300) -> list[torch.Tensor]:
    """Per MoE layer, tokens routed to each expert (top-k picks) in a forward pass on random token ids."""
    picks: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):  # the router modules (Mixtral's block_sparse_moe is renamed mlp)
            hooks.append(mod.register_forward_hook(
                lambda _m, _i, out, name=name: picks.setdefault(name, []).append(out[2].reshape(-1))))
    ids = torch.randint(3, vocab, (n_seqs, seq), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    assert picks, "no router found"
    return [torch.bincount(torch.cat(v), minlength=n_experts).float() for _, v in sorted(picks.items())]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_model(MakeModelOptions(family=fam, **TINY), root / fam) for fam in SUPPORTED_FAMILIES}


# -- per family: transformers loads exactly what we wrote ---------------------------------

@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_family_loads_in_transformers(family, tiny_models, tmp_path):
    d = tiny_models[family]
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    tensors = read_checkpoint(d)
    opts = MakeModelOptions(family=family, **TINY)
    assert {t.name: t.shape for t in tensor_plan(opts)} == {k: tuple(v.shape) for k, v in tensors.items()}

    model = load_hf(d)
    assert type(model).__name__ == build_config(opts)["architectures"][0]
    assert_params_equal(model, tensors)

    ids = torch.randint(0, TINY["vocab"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 9, TINY["vocab"])
    assert torch.isfinite(logits).all()

    # save_pretrained of the loaded model writes back exactly our key set, shapes and values
    model.save_pretrained(tmp_path / "resaved")
    resaved = read_checkpoint(tmp_path / "resaved")
    assert set(resaved) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(resaved[k], t), k


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_config_parses_to_spec(family, tiny_models):
    cfg = json.loads((tiny_models[family] / "config.json").read_text())
    assert cfg["model_type"] == family
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    assert cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (BOS_ID, EOS_ID)
    spec = spec_from_config(cfg)
    assert spec == load_spec(tiny_models[family])
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers, spec.num_heads) == (300, 64, 3, 4)
    assert spec.bos_token_id == BOS_ID and spec.eos_token_ids == (EOS_ID,)
    assert spec.max_position_embeddings == 4096
    if family in ("llama", "qwen2"):
        assert spec.moe is None and spec.dense_intermediate_size == 256
        assert spec.num_kv_heads == 2 and spec.head_dim == 16
        return
    moe = spec.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size) == (8, 2, 128)
    if family.startswith("deepseek"):
        assert spec.moe_layers == (1, 2) and spec.dense_intermediate_size == 256
        assert moe.shared_intermediate_size == 128
        assert spec.mla is not None and spec.mla.kv_lora_rank == 32
        if family == "deepseek_v3":
            assert spec.mla.q_lora_rank == 32
            assert (moe.scoring, moe.topk_method, moe.has_correction_bias) == ("sigmoid", "noaux_tc", True)
            assert (moe.n_group, moe.topk_group) == (4, 2) and moe.norm_topk_prob
        else:
            assert spec.mla.q_lora_rank is None
            assert (moe.scoring, moe.topk_method) == ("softmax", "greedy")
    else:
        assert spec.moe_layers == (0, 1, 2)
        assert spec.num_kv_heads == 2 and spec.head_dim == 16
    if family == "qwen2_moe":
        assert spec.qkv_bias and moe.shared_expert_gated and moe.shared_intermediate_size == 256
    if family == "qwen3_moe":
        assert spec.qk_norm == "per_head" and moe.norm_topk_prob
    if family == "olmoe":
        assert spec.qk_norm == "full"


def test_deepseek_v3_groups_and_first_dense():
    two = build_config(MakeModelOptions(family="deepseek_v3", layers=2, experts=6, top_k=4))
    assert two["first_k_dense_replace"] == 0
    assert two["n_routed_experts"] % two["n_group"] == 0 and two["n_routed_experts"] // two["n_group"] >= 2
    assert two["topk_group"] * (two["n_routed_experts"] // two["n_group"]) >= two["num_experts_per_tok"]
    assert build_config(MakeModelOptions(family="deepseek_v2", layers=3))["first_k_dense_replace"] == 1


# -- sharding, dtype, determinism, file format ---------------------------------------------

def test_sharded_bf16_checkpoint(tmp_path):
    opts = MakeModelOptions(family="deepseek_v3", **{**TINY, "dtype": "bfloat16"}, max_shard_bytes=200_000)
    d = make_model(opts, tmp_path / "sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in d.glob("model*.safetensors"))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    on_disk: dict[str, str] = {}
    for f in files:
        with safe_open(d / f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                on_disk[k] = f
    assert index["weight_map"] == on_disk
    assert set(index["weight_map"]) == {t.name for t in tensor_plan(opts)}
    tensors = read_checkpoint(d)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    # DeepSeek ships the correction bias in float32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    # each tensor depends only on (seed, name): unsharded writing gives the same values
    whole = read_checkpoint(make_model(MakeModelOptions(family="deepseek_v3", **{**TINY, "dtype": "bfloat16"}),
                                       tmp_path / "whole"))
    assert set(whole) == set(tensors) and all(torch.equal(whole[k], tensors[k]) for k in whole)

    model = load_hf(d)
    assert model.dtype == torch.bfloat16
    assert_params_equal(model, tensors)  # transformers also keeps the correction bias in float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 7, 9]])).logits).all()


def test_same_seed_same_bytes(tmp_path):
    opts = MakeModelOptions(family="qwen2_moe", layers=2, vocab=320, skew=0.5, max_shard_bytes=300_000)
    a, b = make_model(opts, tmp_path / "a"), make_model(opts, tmp_path / "b")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = read_checkpoint(make_model(MakeModelOptions(family="qwen2_moe", layers=2, vocab=320, seed=1),
                                       tmp_path / "c"))
    mine = read_checkpoint(a)
    assert not torch.equal(mine["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_rewrite_removes_stale_shards(tmp_path):
    d = make_model(MakeModelOptions(family="mixtral", layers=1, vocab=300, max_shard_bytes=100_000), tmp_path)
    assert (d / "model.safetensors.index.json").exists()
    make_model(MakeModelOptions(family="mixtral", layers=1, vocab=300), d)
    assert sorted(p.name for p in d.glob("model*")) == ["model.safetensors"]


def test_streamed_file_is_byte_identical_to_save_file(tiny_models, tmp_path):
    ours = tiny_models["deepseek_v3"] / "model.safetensors"
    save_file(load_file(ours), tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_init_statistics():
    opts = MakeModelOptions(family="mixtral", hidden=256, intermediate=512, experts=4, layers=1, vocab=300,
                            dtype="float32")
    plan = {t.name: t for t in tensor_plan(opts)}
    w1 = init_tensor(plan["model.layers.0.block_sparse_moe.experts.0.w1.weight"], opts)
    assert abs(w1.std().item() - 0.02) < 0.002 and abs(w1.mean().item()) < 0.002
    norm = init_tensor(plan["model.layers.0.input_layernorm.weight"], opts)
    assert abs(norm.mean().item() - 1.0) < 0.01 and norm.std().item() < 0.05
    gate = init_tensor(plan["model.layers.0.block_sparse_moe.gate.weight"], opts)
    assert torch.allclose(gate.norm(dim=1), torch.ones(4))


# -- skew ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_skew_makes_expert_load_uneven(family, tmp_path):
    base = dict(layers=3, hidden=64, intermediate=64, experts=8, top_k=2, vocab=300, dtype="float32")
    loads = {}
    for skew in (0.0, 1.2):
        d = make_model(MakeModelOptions(family=family, skew=skew, **base), tmp_path / f"s{skew}")
        loads[skew] = expert_load(load_hf(d), 8)
    for counts in loads[0.0]:
        assert counts.max() / counts.mean() < 1.7, counts        # roughly uniform
    for counts in loads[1.2]:
        assert counts.max() / counts.mean() > 2.0, counts        # clearly uneven
        assert counts.argmax() == 0 and counts[:2].sum() > counts[-2:].sum() * 3, counts


def test_skew_protected_subspace_is_untouched():
    opts = MakeModelOptions(family="qwen2_moe", layers=1, skew=1.0, dtype="float32", vocab=300)
    from moeyard.model.make_model_tensors import _basis  # the [u, S] basis
    q = _basis(opts)
    assert q.shape == (64, 1 + routing_subspace_dims(opts))
    for t in tensor_plan(opts):
        w = init_tensor(t, opts)
        if t.init == "reader":
            assert (w @ q).abs().max() < 1e-6, t.name
        elif t.init == "writer":
            assert (q.T @ w).abs().max() < 1e-6, t.name
        elif t.init == "embed":
            assert torch.allclose(w @ q[:, 0], torch.full((300,), 0.02 * 8.0), atol=1e-6)


# -- tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [300, 1000, 32000])
def test_tokenizer_sizes_and_ids(vocab):
    tok = build_tokenizer(vocab)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [UNK_ID, BOS_ID, EOS_ID]
    for i in range(vocab):  # every id decodes
        assert isinstance(tok.decode([i], skip_special_tokens=False), str)
        assert tok.id_to_token(i) is not None
    if vocab == 32000:
        assert tok.id_to_token(vocab - 1).startswith("<extra_")
    assert tok.to_str() == build_tokenizer(vocab).to_str()  # deterministic


def test_tokenizer_round_trip(tiny_models):
    tok = build_tokenizer(300)
    for text in ["Hello world, the quick brown fox jumps over the lazy dog.",
                 "  spaces\tand\nnewlines  ", "café 東京 🙂 x=1e-5; {\"a\": [1, 2]}", ""]:
        enc = tok.encode(text)
        assert enc.ids[:1] == [BOS_ID]
        assert max(enc.ids) < 300
        assert tok.decode(enc.ids) == text
    hf = transformers.AutoTokenizer.from_pretrained(tiny_models["mixtral"])
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (BOS_ID, EOS_ID, UNK_ID)
    assert len(hf) == 300
    text = "the router sends tokens to experts"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text
    cfg = json.loads((tiny_models["mixtral"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<s>", "</s>")


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError):
        build_tokenizer(100)


# -- options and command line ----------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(family="gpt2"), dict(family="mixtral", dtype="float16"), dict(family="mixtral", top_k=9),
    dict(family="mixtral", hidden=60, heads=8), dict(family="mixtral", heads=4, kv_heads=3),
    dict(family="mixtral", vocab=200), dict(family="llama", skew=1.0), dict(family="mixtral", skew=-1.0),
    dict(family="mixtral", max_shard_bytes=0),
])
def test_bad_options(kw):
    with pytest.raises(ValueError):
        MakeModelOptions(**kw)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--family", "olmoe", "--layers", "1", "--vocab", "300", "--experts", "4",
                 "--dtype", "float32", "--max-shard-bytes", "50000"]) == 0
    assert "wrote olmoe checkpoint" in capsys.readouterr().out
    spec = load_spec(out)
    assert spec.moe.num_experts == 4 and spec.torch_dtype == "float32"
    assert (out / "model.safetensors.index.json").exists()
