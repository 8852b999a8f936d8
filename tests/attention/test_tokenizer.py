"""Prompt encoding: the BOS token where the checkpoint's tokenizer config asks for it, chat templates."""

from __future__ import annotations

import json

import pytest

from moeyard.attention.sequence import RequestError
from moeyard.attention.tokenizer import ChatMessage, load_tokenizer
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions
from moeyard.model.tokenizer_builder import BOS_ID


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "m"
    make_model(MakeModelOptions(family="llama", layers=1, hidden=32, intermediate=32, heads=2, kv_heads=1,
                                vocab=300), out)
    return out


def test_plain_prompts_get_bos_where_the_config_says_so(model_dir):
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["add_bos_token"] is True
    tok = load_tokenizer(model_dir)
    with_bos, without = tok.encode("the expert router"), tok.encode("the expert router", add_bos=False)
    assert with_bos == [BOS_ID, *without] and BOS_ID not in without
    assert tok.encode("") == [BOS_ID]


def test_no_bos_where_the_config_does_not_ask(model_dir, tmp_path):
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("the expert router") == tok.encode("the expert router", add_bos=False)


def test_chat_needs_a_template(model_dir):
    with pytest.raises(RequestError, match="no chat template"):
        load_tokenizer(model_dir).apply_chat_template([ChatMessage("user", "hi")])


def test_a_template_that_raises_is_a_request_error(model_dir, tmp_path):
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('roles must be user or assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([ChatMessage("user", "hi")]) == "hi"
    with pytest.raises(RequestError, match="roles must be user or assistant"):
        tok.apply_chat_template([ChatMessage("robot", "hi")])
