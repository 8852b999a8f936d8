"""JSON paths for error messages: ``spec.workerGroupSpecs[1].rayStartParams``.

Every validator in :mod:`moeyard.cluster.k8s.validate` reports errors as ``<json path>: <what is wrong>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def json_path(parts: Iterable[Any]) -> str:
    """``["spec", "workerGroupSpecs", 1, "rayStartParams"]`` -> ``spec.workerGroupSpecs[1].rayStartParams``."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "<root>"


def _join(path: str, *more: Any) -> str:
    return json_path([path, *more]) if path != "<root>" else json_path(more)
