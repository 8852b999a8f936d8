"""Calibration text for ``moeyard upcycle --router kmeans``: a text file, else a licence text an installed
package ships (no downloads), tokenized with the dense checkpoint's tokenizer."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import torch

from moeyard.attention.ffn_capture import ffn_inputs
from moeyard.attention.tokenizer import load_tokenizer
from moeyard.model.upcycle import UpcycleError

MIN_TOKENS = 64


def calibration_ids(model_dir: Path, calib: Path | None, max_tokens: int = 2048) -> list[int]:
    """Token ids of ``calib`` (else of :func:`installed_licence_text`), at most ``max_tokens``."""
    tok = load_tokenizer(model_dir)
    if tok is None:
        raise UpcycleError(f"{model_dir} has no tokenizer.json: the calibration text cannot be tokenized")
    if calib is not None:
        try:
            text = calib.read_text(errors="replace")
        except OSError as e:
            raise UpcycleError(f"calibration text {calib} cannot be read ({e.strerror})") from None
    else:
        text = installed_licence_text()
    ids = tok.encode(text, add_bos=False)[:max_tokens]
    if len(ids) < MIN_TOKENS:
        raise UpcycleError(f"the calibration text is too short ({len(ids)} tokens; at least {MIN_TOKENS})")
    return ids


def calibration_inputs(model_dir: Path, calib: Path | None) -> list[torch.Tensor]:
    """Per decoder layer, the dense model's FFN inputs on the calibration text (see :func:`calibration_ids`)."""
    return ffn_inputs(model_dir, calibration_ids(model_dir, calib))


def installed_licence_text() -> str:
    """The longest licence text among the installed distributions (the same on every install of our pins)."""
    best, best_key = "", ("", "")
    for dist in metadata.distributions():
        for f in dist.files or []:
            if f.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")) and f.suffix in ("", ".txt", ".md"):
                try:
                    text = f.read_text()
                except (OSError, UnicodeDecodeError):
                    continue
                key = (str(dist.metadata["Name"]), str(f))
                if len(text) > len(best) or (len(text) == len(best) and key < best_key):
                    best, best_key = text, key
    if not best:
        raise UpcycleError("no calibration text found among the installed packages: pass --calib FILE")
    return best
