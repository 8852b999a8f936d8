"""Tokenizer of a checkpoint, from its ``tokenizer.json`` via ``tokenizers``, and its chat template
(``tokenizer_config.json``'s ``chat_template``, a Jinja template rendered as ``transformers`` does)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from moeyard.attention.sequence import RequestError


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class TextTokenizer:
    def __init__(self, tok: Tokenizer, chat_template: str | None = None, special: dict[str, str] | None = None,
                 bos_token_id: int | None = None):
        self.tok = tok
        self.bos_token_id = bos_token_id
        """Put in front of a plain prompt (the tokenizer config's ``add_bos_token``); None: nothing."""
        self.chat_template = chat_template
        """The checkpoint's Jinja chat template (None: it has none)."""
        self.special = dict(special or {})
        """``bos_token``/``eos_token`` texts the template may use."""
        self._template = None

    def apply_chat_template(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The conversation as the prompt text the model was trained on (RequestError without a template)."""
        if not self.chat_template:
            raise RequestError("this checkpoint has no chat template: send a plain prompt")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self.special)
        except TemplateError as e:
            raise RequestError(f"the chat template refused the messages: {e}") from None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_bos`` the BOS token first where the checkpoint's tokenizer config
        asks for it (``add_bos_token``). A rendered chat template carries its own special tokens: encode it
        with ``add_bos=False``."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path) -> TextTokenizer | None:
    """The checkpoint's tokenizer (and chat template), or None when it ships without one."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    config_path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    special = {k: v for k in ("bos_token", "eos_token") if isinstance(v := config.get(k), str)}
    template = config.get("chat_template")
    tok = Tokenizer.from_file(str(path))
    bos = tok.token_to_id(special["bos_token"]) if config.get("add_bos_token") and "bos_token" in special else None
    return TextTokenizer(tok, template if isinstance(template, str) else None, special, bos)


def require_tokenizer(tok: TextTokenizer | None) -> TextTokenizer:
    if tok is None:
        raise RequestError("this checkpoint has no tokenizer.json: send the prompt as token ids")
    return tok


class IncrementalDetokenizer:
    """Text deltas of a growing list of token ids.

    Decodes the whole output each time and emits what was added, holding back
    a trailing replacement character (an incomplete multi-byte sequence).
    """

    def __init__(self, tok: TextTokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        text = self.tok.decode(self.ids)
        end = len(text)
        if not final:
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        delta = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta
