"""The ``messages`` form of ``Generate``: a conversation checked and rendered with the model's chat template."""

from __future__ import annotations

from moeyard.attention.sequence import RequestError
from moeyard.attention.tokenizer import ChatMessage, TextTokenizer
from moeyard.v1 import inference_pb2 as pb

MAX_CHAT_MESSAGES = 256
MAX_ROLE_CHARS = 32


class ChatRefused(ValueError):
    """A conversation the server refuses (INVALID_ARGUMENT); the message names the problem."""


def chat_prompt(tok: TextTokenizer, chat: pb.ChatMessages, max_text_chars: int | None,
                max_model_len: int | None) -> str:
    """The prompt text of ``chat`` (checked first, so a request stays bounded): its messages through the
    model's chat template, with the prompt for the assistant's turn."""
    if not tok.chat_template:
        raise ChatRefused("this model has no chat template: send text or token_ids")
    msgs = list(chat.messages)
    if not msgs:
        raise ChatRefused("messages is empty: send at least one message")
    if len(msgs) > MAX_CHAT_MESSAGES:
        raise ChatRefused(f"messages has {len(msgs)} entries; at most {MAX_CHAT_MESSAGES}")
    for i, m in enumerate(msgs):
        if not m.role or len(m.role) > MAX_ROLE_CHARS or not m.role.isprintable():
            raise ChatRefused(f"messages[{i}].role must be 1-{MAX_ROLE_CHARS} printable characters")
    chars = sum(len(m.content) for m in msgs)
    if max_text_chars is not None and chars > max_text_chars:
        raise ChatRefused(f"messages hold {chars} characters; they cannot fit the maximum context of "
                          f"{max_model_len} tokens")
    try:
        return tok.apply_chat_template([ChatMessage(m.role, m.content) for m in msgs])
    except RequestError as e:
        raise ChatRefused(str(e)) from None
