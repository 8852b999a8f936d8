"""The ``messages`` form of ``Generate``: a conversation rendered with the model's chat template.

Served: a GGUF-converted Llama whose metadata carries a chat template (tests/model/test_gguf_checkpoint.py)
and, for the refusals, the make-model Mixtral without one. The CLI's ``generate --chat --addr`` sends it."""

from __future__ import annotations

import json

import grpc
import pytest

from moeyard.attention.sequence import SamplingParams
from moeyard.attention.tokenizer import ChatMessage
from moeyard.client import Chat, Message, MoeyardClient, MoeyardError
from moeyard.cluster.cli.main import main
from moeyard.model.gguf_checkpoint import convert_gguf
from tests.cluster.serving.test_api_server import TOKEN, make_tiny_model, serve_engine
from tests.model.test_gguf_checkpoint import write_llama_gguf

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def chat_served(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    write_llama_gguf(d / "tiny.gguf")
    served = serve_engine(convert_gguf(d / "tiny.gguf", d / "tiny"))
    yield served
    served.close()


@pytest.fixture(scope="module")
def plain_served(tmp_path_factory):
    served = serve_engine(make_tiny_model(tmp_path_factory.mktemp("plain") / "m"))
    yield served
    served.close()


def test_messages_are_rendered_with_the_chat_template(chat_served):
    convo = Chat((Message("system", "Be brief."), Message("user", "What is the capital of France?")))
    with MoeyardClient(chat_served.addr, token=TOKEN, timeout=60) as c:
        got = c.generate_all(convo, max_new_tokens=8, ignore_eos=True)
    tok = chat_served.engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([ChatMessage(m.role, m.content) for m in convo.messages]),
                        add_bos=False)
    assert got.usage.prompt_tokens == len(prompt)
    from moeyard.attention.engine import EngineConfig, LLMEngine

    ref = LLMEngine(chat_served.engine.model_dir, EngineConfig(dtype="float32"))
    assert got.token_ids == ref.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0]


@pytest.mark.parametrize("convo, message", [
    (Chat(()), "messages is empty"),
    (Chat((Message("", "hi"),)), "messages[0].role must be 1-32 printable characters"),
    (Chat((Message("user\n", "hi"),)), "messages[0].role must be 1-32 printable characters"),
    (Chat(tuple(Message("user", "hi") for _ in range(257))), "messages has 257 entries; at most 256"),
])
def test_bad_messages_are_refused_by_name(chat_served, convo, message):
    with MoeyardClient(chat_served.addr, token=TOKEN, timeout=60) as c:
        with pytest.raises(MoeyardError) as e:
            c.generate_all(convo, max_new_tokens=2)
        assert e.value.code == INVALID and message in e.value.message
        assert c.generate_all(Chat.user("still serving?"), max_new_tokens=2, ignore_eos=True).token_ids


def test_a_model_without_a_chat_template_refuses_messages(plain_served):
    with MoeyardClient(plain_served.addr, token=TOKEN, timeout=60) as c:
        with pytest.raises(MoeyardError) as e:
            c.generate_all(Chat.user("hi"), max_new_tokens=2)
    assert e.value.code == INVALID and "no chat template" in e.value.message


def test_generate_cli_sends_chat_to_a_cluster(chat_served, capsys):
    assert main(["generate", "--addr", chat_served.addr, "--token", TOKEN, "--chat", "--prompt", "hello",
                 "--max-new-tokens", "4", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = chat_served.engine.tokenizer
    chat = tok.apply_chat_template([ChatMessage("user", "hello")])
    assert out["usage"]["prompt_tokens"] == len(tok.encode(chat, add_bos=False))
    assert len(out["token_ids"]) == 4
