"""A checkpoint reader whose tensors are random and made where they will live, for benchmarks of full-size
shapes (a Mixtral-8x7B or DeepSeek-V3 slice) that no disk here could hold or write in time.

It answers what :class:`moeyard.model.checkpoint.CheckpointReader` answers (``get`` with the expected
shape, ``has``). Each tensor is seeded by its name, so every process (an engine and its expert
shards) makes the same weights whatever it reads and in whatever order: norms are ones, DeepSeek-V3's
routing bias zeros, every other tensor normal with standard deviation ``fan_in ** -0.5`` (so
activations keep their scale through the layers and the routing stays near uniform); no bias exists.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch


class RandomWeights:
    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self.seed = seed
        self.generator = torch.Generator(device=self.device)
        self.reads: list[str] = []

    def has(self, name: str) -> bool:
        return not name.endswith(".bias")

    def get(self, name: str, expected_shape: Sequence[int] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        if expected_shape is None:
            raise ValueError(f"RandomWeights needs the expected shape of {name!r}")
        shape, dtype = tuple(expected_shape), dtype or torch.float32
        self.reads.append(name)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=self.device)
        if name.endswith("e_score_correction_bias"):
            return torch.zeros(shape, dtype=dtype, device=self.device)
        self.generator.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=self.generator, dtype=dtype, device=self.device)
        return t.mul_(shape[-1] ** -0.5)

    def get_optional(self, name: str, expected_shape: Sequence[int] | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return self.get(name, expected_shape, dtype) if self.has(name) else None
