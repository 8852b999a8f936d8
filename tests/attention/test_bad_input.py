"""Bad requests and bad checkpoints give clear errors; the engine keeps serving."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import RequestError, SamplingParams
from moeyard.attention.tokenizer import load_tokenizer, require_tokenizer
from moeyard.model.checkpoint import CheckpointError
from moeyard.model.spec import SpecError

MAX_LEN = 32
NORMAL_PROMPT = [5, 17, 33, 101, 7, 9]
NORMAL = SamplingParams(max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine_and_baseline(hf_models):
    ckpt, _ = hf_models("mixtral")
    eng = LLMEngine(ckpt, EngineConfig(dtype="float32", max_model_len=MAX_LEN, block_size=4, num_blocks=64))
    baseline = eng.generate([NORMAL_PROMPT], NORMAL)[0]
    assert len(baseline) == 3
    return eng, baseline


def _still_serves(eng: LLMEngine, baseline: list[int]) -> None:
    assert not eng.has_unfinished()
    assert eng.generate([NORMAL_PROMPT], NORMAL) == [baseline]
    assert eng.blocks.ref == [0] * eng.blocks.num_blocks


BAD_REQUESTS = [
    ("empty prompt", [], SamplingParams(), "prompt is empty"),
    ("prompt longer than context", list(range(3, 3 + MAX_LEN + 8)), SamplingParams(),
     f"maximum context is {MAX_LEN} tokens"),
    ("prompt fills the context", list(range(3, 3 + MAX_LEN)), SamplingParams(),
     f"prompt has {MAX_LEN} tokens"),
    ("max_tokens 0", NORMAL_PROMPT, SamplingParams(max_tokens=0), "must be >= 1, got 0"),
    ("max_tokens negative", NORMAL_PROMPT, SamplingParams(max_tokens=-4), "must be >= 1, got -4"),
    ("negative temperature", NORMAL_PROMPT, SamplingParams(temperature=-0.5), "temperature"),
    ("nan temperature", NORMAL_PROMPT, SamplingParams(temperature=math.nan), "temperature"),
    ("top_p zero", NORMAL_PROMPT, SamplingParams(temperature=1.0, top_p=0.0), "top_p must be in (0, 1]"),
    ("top_p above one", NORMAL_PROMPT, SamplingParams(temperature=1.0, top_p=1.5), "top_p must be in (0, 1]"),
    ("negative top_k", NORMAL_PROMPT, SamplingParams(top_k=-1), "top_k"),
    ("empty stop string", NORMAL_PROMPT, SamplingParams(stop=("",)), "stop strings"),
    ("token id = vocab", [5, 256, 7], SamplingParams(), "token id 256 out of range [0, 256)"),
    ("negative token id", [5, -1], SamplingParams(), "token id -1 out of range"),
]


@pytest.mark.parametrize("prompt,params,needle", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_refused_by_name(engine_and_baseline, prompt, params, needle):
    eng, baseline = engine_and_baseline
    with pytest.raises(RequestError) as ei:
        eng.add_request("bad", prompt, params)
    assert needle in str(ei.value)
    _still_serves(eng, baseline)


def test_duplicate_request_id(engine_and_baseline):
    eng, baseline = engine_and_baseline
    eng.add_request("dup", NORMAL_PROMPT, NORMAL)
    with pytest.raises(RequestError, match="duplicate request id 'dup'"):
        eng.add_request("dup", [9, 9, 9], NORMAL)
    out = []
    while eng.has_unfinished():
        out += [t for o in eng.step() if o.request_id == "dup" for t in o.new_token_ids]
    assert out == baseline  # the first request with that id was not disturbed
    _still_serves(eng, baseline)
    eng.add_request("dup", NORMAL_PROMPT, NORMAL)  # a finished id may be reused
    eng.abort("dup")


def test_generation_stops_at_max_context(engine_and_baseline):
    eng, baseline = engine_and_baseline
    eng.add_request("edge", list(range(3, 3 + MAX_LEN - 2)), SamplingParams(max_tokens=16, ignore_eos=True))
    outs = [o for _ in range(5) for o in eng.step()]
    assert [len(o.new_token_ids) for o in outs] == [1, 1]
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert outs[-1].num_prompt_tokens + outs[-1].num_output_tokens == MAX_LEN
    _still_serves(eng, baseline)


def test_text_prompt_without_tokenizer(hf_models, engine_and_baseline):
    ckpt, _ = hf_models("mixtral")
    assert not (ckpt / "tokenizer.json").exists()
    assert load_tokenizer(ckpt) is None
    eng, _ = engine_and_baseline
    assert eng.tokenizer is None
    with pytest.raises(RequestError, match="token ids"):
        require_tokenizer(eng.tokenizer)


# -- doctored checkpoints ------------------------------------------------------------------

def _copy(src, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def _edit_tensors(d, edit) -> None:
    with safe_open(d / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})


def _edit_config(d, edit) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _build(d):
    return LLMEngine(d, EngineConfig(dtype="float32", num_blocks=8))


@pytest.fixture
def mixtral_copy(hf_models, tmp_path):
    ckpt, _ = hf_models("mixtral")
    return _copy(ckpt, tmp_path / "ckpt")


def test_unsupported_family(mixtral_copy):
    _edit_config(mixtral_copy, lambda c: c.update(model_type="gpt_neox"))
    with pytest.raises(SpecError) as ei:
        _build(mixtral_copy)
    assert "'gpt_neox'" in str(ei.value)
    assert "mixtral" in str(ei.value) and "deepseek_v3" in str(ei.value)


def test_quantized_checkpoint(mixtral_copy):
    _edit_config(mixtral_copy, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}))
    with pytest.raises(SpecError, match="quantization_config.*awq"):
        _build(mixtral_copy)


def test_missing_config_and_missing_weights(mixtral_copy):
    (mixtral_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _build(mixtral_copy)
    (mixtral_copy / "config.json").unlink()
    with pytest.raises(SpecError, match="config.json"):
        _build(mixtral_copy)


# (tensor, expected shape from the config: hidden 64, 4 heads x 16, 2 kv heads, expert inter 96, vocab 256)
MISSING = [("model.layers.1.self_attn.k_proj.weight", [32, 64]),
           ("model.norm.weight", [64]),
           ("model.layers.0.block_sparse_moe.gate.weight", [8, 64]),
           ("model.layers.1.block_sparse_moe.experts.3.w2.weight", [64, 96])]


@pytest.mark.parametrize("name,shape", MISSING)
def test_missing_tensor_is_named(mixtral_copy, name, shape):
    _edit_tensors(mixtral_copy, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as ei:
        _build(mixtral_copy)
    msg = str(ei.value)
    assert f"missing tensor '{name}'" in msg
    assert str(shape) in msg


WRONG = [("model.layers.0.self_attn.o_proj.weight", [64, 32], [64, 64]),
         ("lm_head.weight", [255, 64], [256, 64]),
         ("model.layers.0.block_sparse_moe.experts.5.w1.weight", [95, 64], [96, 64])]


@pytest.mark.parametrize("name,bad,good", WRONG)
def test_wrong_shape_is_named(mixtral_copy, name, bad, good):
    _edit_tensors(mixtral_copy, lambda t: t.__setitem__(name, torch.zeros(bad)))
    with pytest.raises(CheckpointError) as ei:
        _build(mixtral_copy)
    msg = str(ei.value)
    assert f"'{name}'" in msg
    assert f"has shape {bad}, expected {good}" in msg
