"""Synthetic expert load for tests, demos and benchmarks."""

from __future__ import annotations

import numpy as np
import torch


def zipf_load(L: int, E: int, s: float = 1.2, seed: int = 0, tokens: int = 1 << 16) -> torch.Tensor:
    """``[L, E]`` tokens: Zipf(s) popularity, a random expert order per layer, multinomial counts."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, E + 1) ** s
    base /= base.sum()
    return torch.tensor(np.stack([rng.multinomial(tokens, rng.permutation(base)) for _ in range(L)]),
                        dtype=torch.float64)
