"""Grouped SwiGLU over physical slots (pure tensor math).

Tokens arrive already sorted by slot; each slot's rows are one contiguous
segment, so every slot runs as one matmul over all of its tokens (there is no
loop over tokens, only over the slots that received any).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grouped_swiglu(x: torch.Tensor, counts: list[int] | torch.Tensor, w13: torch.Tensor | Sequence[torch.Tensor],
                   w2: torch.Tensor | Sequence[torch.Tensor], slot_index: list[int] | None = None) -> torch.Tensor:
    """Apply slot ``s``'s expert FFN to its segment of ``x``.

    Args:
        x: ``[N, D]`` tokens sorted by slot (segment ``s`` has ``counts[s]`` rows).
        counts: ``[S]`` rows per slot, summing to ``N``.
        w13: ``[S, 2I, D]`` gate and up projections stacked (gate first), or a
            sequence of ``S`` tensors ``[2I, D]`` (a shard's slots, each in its own storage).
        w2: ``[S, D, I]`` down projections, or ``S`` tensors ``[D, I]``.
        slot_index: optional ``[S']``: segment ``s`` uses weights ``slot_index[s]``
            (``len(counts) == S'``); without it segment ``s`` uses weights ``s``.

    Returns:
        ``[N, D]`` expert outputs in ``x``'s order and dtype.
    """
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    if slot_index is None:
        slot_index = list(range(len(w13)))
    if len(counts) != len(slot_index):
        raise ValueError(f"counts has {len(counts)} segments, slot_index has {len(slot_index)}")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)}, x has {x.shape[0]} rows")
    out = torch.empty_like(x)
    inter = w2[0].shape[-1]
    start = 0
    for s, n in enumerate(counts):
        if n == 0:
            continue
        seg = x[start:start + n]
        w = slot_index[s]
        h = seg @ w13[w].t()
        act = F.silu(h[:, :inter]) * h[:, inter:]
        out[start:start + n] = act @ w2[w].t()
        start += n
    return out


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP: ``x [T, D]``, ``gate/up [I, D]``, ``down [D, I]`` -> ``[T, D]``."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
