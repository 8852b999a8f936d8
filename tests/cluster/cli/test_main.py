"""The ``moeyard`` CLI: make-model then generate, cross-checked with transformers."""

from __future__ import annotations

import json

import pytest
import torch

from moeyard.cluster.cli.main import main


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "qwen3"
    assert main(["make-model", "--family", "qwen3_moe", "--out", str(out), "--layers", "2", "--hidden", "64",
                 "--experts", "8", "--vocab", "400", "--dtype", "float32", "--seed", "3"]) == 0
    return out


def _json_last_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_matches_transformers(demo_model, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["generate", "--model", str(demo_model), "--token-ids", "5,17,99,250,3,42",
                 "--max-new-tokens", "12", "--ignore-eos", "--json"]) == 0
    out = _json_last_line(capsys)
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 12}
    assert out["finish_reason"] == "length"
    hf = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 17, 99, 250, 3, 42]]), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)[0, 6:].tolist()
    assert out["token_ids"] == ref


def test_generate_text_prompt_uses_tokenizer(demo_model, capsys):
    from tokenizers import Tokenizer

    assert main(["generate", "--model", str(demo_model), "--prompt", "the router picks experts",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = _json_last_line(capsys)
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    # the text's tokens, after the BOS token the checkpoint's tokenizer config asks for (add_bos_token)
    assert out["usage"]["prompt_tokens"] == 1 + len(tok.encode("the router picks experts",
                                                               add_special_tokens=False).ids)
    assert 1 <= len(out["token_ids"]) <= 4


def test_generate_sampling_is_seeded(demo_model, capsys):
    args = ["generate", "--model", str(demo_model), "--token-ids", "5,6,7", "--max-new-tokens", "10",
            "--temperature", "1.0", "--top-p", "0.9", "--ignore-eos", "--json"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main(args + ["--seed", seed]) == 0
        runs.append(_json_last_line(capsys)["token_ids"])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("extra, message", [
    (["--token-ids", "5,6", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--token-ids", "5,6", "--temperature", "-1"], "temperature"),
    (["--token-ids", "5,999999"], "out of range"),
    (["--token-ids", ","], "prompt is empty"),
])
def test_generate_bad_input(demo_model, capsys, extra, message):
    assert main(["generate", "--model", str(demo_model)] + extra) == 2
    assert message in capsys.readouterr().err


def test_generate_not_a_checkpoint(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--token-ids", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err
