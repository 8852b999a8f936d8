"""Tokenizer of a checkpoint, from its ``tokenizer.json`` via ``tokenizers``."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moeyard.attention.sequence import RequestError


class TextTokenizer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path) -> TextTokenizer | None:
    """The checkpoint's tokenizer, or None when it ships without one."""
    path = Path(model_dir) / "tokenizer.json"
    return TextTokenizer(Tokenizer.from_file(str(path))) if path.is_file() else None


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
