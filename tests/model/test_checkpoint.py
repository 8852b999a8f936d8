"""CheckpointReader: single file vs shards, clear errors, and who reads what."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.attention.weights import load_attention_weights
from moeyard.expert_actors.slots import ExpertSlots
from moeyard.model.checkpoint import CheckpointError, CheckpointReader
from moeyard.model.spec import load_spec
from moeyard.model.weight_names import is_expert_tensor
from tests.conftest import FAMILIES

MOE_FAMILIES = [f for f in FAMILIES if f not in ("llama", "qwen2")]


def _all_tensors(ckpt) -> dict[str, torch.Tensor]:
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write_sharded(src, dst) -> dict[str, str]:
    """Split ``src``'s single-file checkpoint into two shards + index in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = _all_tensors(src)
    names = sorted(tensors)
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    parts = ({n: tensors[n] for n in names[0::2]}, {n: tensors[n] for n in names[1::2]})
    weight_map = {}
    for fname, part in zip(files, parts):
        save_file({k: v.contiguous() for k, v in part.items()}, str(dst / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return weight_map


class _NoExpertsTransport:
    """Stands in for remote expert shards; the engine must not need it to start."""

    def submit(self, moe_layer, batches, epoch):  # pragma: no cover - never called here
        raise AssertionError("no expert work expected")

    def refresh(self, shard):
        pass

    def close(self):
        pass


# -- single file vs shards ---------------------------------------------------------

@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_sharded_equals_single_file(family, hf_models, tmp_path):
    ckpt, _ = hf_models(family)
    weight_map = _write_sharded(ckpt, tmp_path / "sharded")
    assert len(set(weight_map.values())) == 2
    single = CheckpointReader(ckpt)
    sharded = CheckpointReader(tmp_path / "sharded")
    assert sorted(single.names()) == sorted(sharded.names()) == sorted(_all_tensors(ckpt))
    for name in single.names():
        a, b = single.get(name), sharded.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name
        assert single.shape(name) == sharded.shape(name) == tuple(a.shape)
    # the sharded checkpoint also serves: identical weights give identical logits
    prompt = [5, 17, 33, 101, 7]
    ref = LLMEngine(ckpt, EngineConfig(dtype="float32", num_blocks=16))
    shd = LLMEngine(tmp_path / "sharded", EngineConfig(dtype="float32", num_blocks=16))
    p = SamplingParams(max_tokens=4, ignore_eos=True)
    assert ref.generate([prompt], p) == shd.generate([prompt], p)


def test_index_pointing_to_missing_shard(hf_models, tmp_path):
    ckpt, _ = hf_models("llama")
    d = tmp_path / "broken"
    _write_sharded(ckpt, d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        CheckpointReader(d)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(tmp_path)


# -- errors name the tensor ------------------------------------------------------------

def test_missing_tensor_names_tensor_and_expected_shape(hf_models):
    ckpt, _ = hf_models("llama")
    reader = CheckpointReader(ckpt)
    name = "model.layers.0.self_attn.no_such_proj.weight"
    with pytest.raises(CheckpointError) as ei:
        reader.get(name, (48, 64))
    msg = str(ei.value)
    assert name in msg and "missing" in msg and "[48, 64]" in msg
    assert reader.reads == []
    assert reader.get_optional(name, (48, 64)) is None


def test_wrong_shape_names_tensor_got_and_expected(hf_models):
    ckpt, _ = hf_models("llama")
    reader = CheckpointReader(ckpt)
    name = "model.layers.1.self_attn.k_proj.weight"
    actual = list(_all_tensors(ckpt)[name].shape)
    assert actual == [32, 64]  # 2 kv heads x 16, hidden 64
    with pytest.raises(CheckpointError) as ei:
        reader.get(name, (64, 64))
    msg = str(ei.value)
    assert name in msg and str(actual) in msg and "[64, 64]" in msg
    assert reader.reads == []  # a refused tensor is not read


def test_get_checks_shape_casts_and_records(hf_models):
    ckpt, _ = hf_models("llama")
    reader = CheckpointReader(ckpt)
    name = "model.embed_tokens.weight"
    assert reader.shape(name) == (256, 64)
    assert reader.reads == []  # shape comes from the header only
    t = reader.get(name, (256, 64), torch.bfloat16)
    assert t.dtype == torch.bfloat16
    assert torch.equal(t, _all_tensors(ckpt)[name].to(torch.bfloat16))
    assert reader.reads == [name]


# -- who reads what -----------------------------------------------------------------

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_attention_side_reads_no_expert_tensor(family, hf_models):
    ckpt, _ = hf_models(family)
    spec = load_spec(ckpt)
    reader = CheckpointReader(ckpt)
    load_attention_weights(reader, spec, torch.float32)
    expert_reads = [n for n in reader.reads if is_expert_tensor(n)]
    assert expert_reads == []
    # ... and it reads everything else the checkpoint holds, each tensor once
    expert_names_in_ckpt = {n for n in reader.names() if re.search(r"\.experts\.\d+\.", n)}
    assert expert_names_in_ckpt, "fixture should have per-expert tensors"
    assert sorted(reader.reads) == sorted(set(reader.names()) - expert_names_in_ckpt)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_slots_read_only_their_experts(family, hf_models):
    ckpt, _ = hf_models(family)
    spec = load_spec(ckpt)
    reader = CheckpointReader(ckpt)
    moe_layer = spec.num_moe_layers - 1
    layer = spec.moe_layers[moe_layer]
    # expert 5 twice (a redundant copy): still read once
    assignments = [(40, 1), (41, 5), (42, 6), (43, 5)]
    slots = ExpertSlots(spec, torch.float32)
    nbytes = slots.load(reader, moe_layer, assignments)
    experts = {e for _, e in assignments}
    expected = {n for n in reader.names()
                if (m := re.match(rf"model\.layers\.{layer}\.[a-z_]+\.experts\.(\d+)\.", n)) and int(m[1]) in experts}
    assert len(expected) == 3 * len(experts)
    assert sorted(reader.reads) == sorted(expected)
    assert slots.slots(moe_layer) == {40: 1, 41: 5, 42: 6, 43: 5}
    per_expert = 3 * spec.hidden_size * spec.moe.intermediate_size * 4
    assert nbytes == len(assignments) * per_expert
    # the other MoE layers hold nothing
    for other in range(spec.num_moe_layers):
        if other != moe_layer:
            assert slots.slots(other) == {}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_engine_with_remote_experts_reads_no_expert_tensor(family, hf_models):
    ckpt, _ = hf_models(family)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", num_blocks=8), transport=_NoExpertsTransport())
    assert engine.reader.reads, "the attention side must have read its weights"
    assert [n for n in engine.reader.reads if is_expert_tensor(n)] == []
    assert not any(".experts." in n for n in engine.reader.reads)


def test_in_process_engine_reads_experts_through_its_own_reader(hf_models):
    """Sanity check of the above: without a transport the engine loads all experts itself."""
    ckpt, _ = hf_models("mixtral")
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32", num_blocks=8))
    # the attention reader stays expert-free even when experts are local
    assert not any(is_expert_tensor(n) for n in engine.reader.reads)
    shards = engine.router.dispatcher.transport.shards
    held = {(layer, e) for s in shards.values() for layer in range(engine.spec.num_moe_layers)
            for e in s.slots(layer).values()}
    assert held == {(layer, e) for layer in range(engine.spec.num_moe_layers) for e in range(8)}
