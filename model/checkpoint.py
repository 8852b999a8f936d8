"""Lazy reader for Hugging Face safetensors checkpoints.

A checkpoint is either one ``model.safetensors`` or several shards listed in
``model.safetensors.index.json``. Tensors are memory-mapped and read one at a
time, so that each component reads only what it owns: the attention side never
touches an expert tensor and an expert shard reads only its own experts. Every
read is recorded in :attr:`CheckpointReader.reads` so tests can prove it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A tensor is missing or has the wrong shape; the message names it."""


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.reads: list[str] = []
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            for name, fname in weight_map.items():
                path = self.model_dir / fname
                if not path.is_file():
                    raise CheckpointError(f"{index} maps {name!r} to {fname!r}, which does not exist")
                self._files[name] = path
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                for name in f.keys():
                    self._files[name] = single
        else:
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {self.model_dir}")

    def _handle(self, path: Path):
        with self._lock:
            h = self._handles.get(path)
            if h is None:
                h = safe_open(path, framework="pt")
                self._handles[path] = h
            return h

    def names(self) -> list[str]:
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header; reads no tensor data."""
        self._require(name, None)
        return tuple(self._handle(self._files[name]).get_slice(name).get_shape())

    def _require(self, name: str, expected: Sequence[int] | None) -> None:
        if name not in self._files:
            want = f" (expected shape {list(expected)})" if expected is not None else ""
            raise CheckpointError(f"checkpoint {self.model_dir} is missing tensor {name!r}{want}")

    def get(self, name: str, expected_shape: Sequence[int] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor, check its shape, optionally cast it."""
        self._require(name, expected_shape)
        if expected_shape is not None:
            got = self.shape(name)
            if tuple(got) != tuple(expected_shape):
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(got)}, expected {list(expected_shape)}")
        t = self._handle(self._files[name]).get_tensor(name)
        self.reads.append(name)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def get_optional(self, name: str, expected_shape: Sequence[int] | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return self.get(name, expected_shape, dtype) if name in self._files else None
