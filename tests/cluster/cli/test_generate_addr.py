"""``moeyard generate --addr``: the CLI through the inference API equals the in-process engine."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from moeyard.cluster.cli.main import main
from tests.cluster.serving.test_api_server import TOKEN, make_tiny_model, serve_engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cli-addr") / "mixtral")


@pytest.fixture(scope="module")
def addr(model_dir):
    s = serve_engine(model_dir)
    yield s.addr
    s.close()


@pytest.fixture(autouse=True)
def no_ambient_token(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEYARD_API_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.moeyard/token


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


ARGS = ["--token-ids", "1,2,3", "--max-new-tokens", "5", "--ignore-eos", "--json"]


@pytest.fixture(scope="module")
def in_process(model_dir):
    """What `generate --model` prints for ARGS (the in-process engine)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["generate", "--model", str(model_dir), *ARGS]) == 0
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_addr_json_matches_in_process(addr, in_process, capsys):
    assert main(["generate", "--addr", addr, "--token", TOKEN, *ARGS]) == 0
    out = _last_json(capsys)
    assert out["token_ids"] == in_process["token_ids"] and len(out["token_ids"]) == 5
    assert out["text"] == in_process["text"]
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5}
    assert out["request_id"]


def test_brief_example_without_ignore_eos(addr, model_dir, capsys):
    args = ["--token-ids", "1,2,3", "--max-new-tokens", "5", "--json"]
    assert main(["generate", "--model", str(model_dir), *args]) == 0
    local = _last_json(capsys)
    assert main(["generate", "--addr", addr, "--token", TOKEN, *args]) == 0
    assert _last_json(capsys)["token_ids"] == local["token_ids"]


def test_token_from_env_and_file(addr, in_process, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MOEYARD_API_TOKEN", TOKEN)
    assert main(["generate", "--addr", addr, *ARGS]) == 0
    assert _last_json(capsys)["token_ids"] == in_process["token_ids"]
    monkeypatch.delenv("MOEYARD_API_TOKEN")
    (tmp_path / ".moeyard").mkdir()
    (tmp_path / ".moeyard" / "token").write_text(TOKEN + "\n")
    assert main(["generate", "--addr", addr, *ARGS]) == 0
    assert _last_json(capsys)["token_ids"] == in_process["token_ids"]


def test_wrong_or_missing_token_exits_1(addr, capsys):
    assert main(["generate", "--addr", addr, "--token", "wrong-secret-xyz", *ARGS]) == 1
    cap = capsys.readouterr()
    assert cap.err.startswith("error: UNAUTHENTICATED: ")
    assert "wrong-secret-xyz" not in cap.err + cap.out
    assert main(["generate", "--addr", addr, *ARGS]) == 1  # no token anywhere
    assert "error: UNAUTHENTICATED: " in capsys.readouterr().err


def test_invalid_argument_exits_1(addr, capsys):
    assert main(["generate", "--addr", addr, "--token", TOKEN, "--token-ids", "1,2", "--top-p", "1.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: ") and "top_p" in err


def test_text_streams_without_json(addr, model_dir, capsys):
    from moeyard.attention.tokenizer import load_tokenizer

    assert main(["generate", "--addr", addr, "--token", TOKEN, "--prompt", "the router picks experts",
                 "--max-new-tokens", "8", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert main(["generate", "--addr", addr, "--token", TOKEN, "--prompt", "the router picks experts",
                 "--max-new-tokens", "8", "--ignore-eos", "--json"]) == 0
    res = _last_json(capsys)
    assert out == res["text"] + "\n"
    assert res["text"] == load_tokenizer(model_dir).decode(res["token_ids"])


def test_unreachable_addr_exits_1(capsys):
    assert main(["generate", "--addr", "127.0.0.1:1", "--token", TOKEN, "--timeout", "5", *ARGS]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")
