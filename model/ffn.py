"""Grouped SwiGLU over physical slots (pure tensor math).

Tokens arrive already sorted by slot; each slot's rows are one contiguous
segment, so every slot runs as one matmul over all of its tokens (there is no
loop over tokens, only over the slots that received any).

Row buckets (bf16 on CPU): torch runs a bf16 CPU matmul through oneDNN, which
JIT-compiles a new matmul primitive for every distinct row count ``M`` (0.1-2 ms
each, on the step's critical path) and caches up to 1024 of them
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), 0.3-0.7 MiB each. Segment sizes vary from
call to call, so a shard would keep compiling and its RSS would climb by hundreds
of MiB as new sizes turn up (~0.75 GiB on the bench model). A segment of ``n`` rows
therefore runs at :func:`bucket_rows` ``(n)`` rows (``n`` itself up to 16, then
8 sizes per power of two, at most 12.5% more rows): the rows after the segment
are the next segments' (or zeros past the end) and their outputs are dropped. A
shard then meets a fixed, small set of matmul shapes (72 row counts up to 2048
per weight shape) whatever the traffic. float32 (MKL, no per-shape code) and
other devices run each segment at its own size.
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
    bucketed = uses_row_buckets(x)
    total = x.shape[0]
    start = 0
    for s, n in enumerate(counts):
        if n == 0:
            continue
        m = bucket_rows(n) if bucketed else n
        if start + m <= total:
            seg = x[start:start + m]  # the rows past n belong to later segments; their outputs are dropped
        else:
            seg = torch.cat([x[start:start + n], x.new_zeros(m - n, x.shape[1])])
        w = slot_index[s]
        h = seg @ w13[w].t()
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = act @ w2[w].t()
        out[start:start + n] = y[:n] if m != n else y
        start += n
    return out


def bucket_rows(n: int) -> int:
    """The row count a segment of ``n`` rows runs at: ``n`` up to 16, else ``n`` rounded up to a
    multiple of ``2**(bit_length(n) - 4)`` (8 sizes per power of two, at most 12.5% more rows)."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def uses_row_buckets(x: torch.Tensor) -> bool:
    """Whether :func:`grouped_swiglu` runs ``x``'s segments at :func:`bucket_rows` sizes:
    reduced precision on CPU (oneDNN's per-shape matmul kernels; see the module docstring)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def linear_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over ``x [T, K]`` run at :func:`bucket_rows` ``(T)`` rows where that matters (bf16 on
    CPU, see the module docstring): the token count of an engine step varies from step to step, and
    each new count would compile (and keep) another oneDNN kernel. Returns ``[T, N]``."""
    t = x.shape[0]
    if x.dim() != 2 or not uses_row_buckets(x) or bucket_rows(t) == t:
        return F.linear(x, w, b)
    padded = torch.cat([x, x.new_zeros(bucket_rows(t) - t, x.shape[1])])
    return F.linear(padded, w, b)[:t]


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Dense SwiGLU MLP: ``x [T, D]``, ``gate/up [I, D]``, ``down [D, I]`` -> ``[T, D]``."""
    return linear_rows(F.silu(linear_rows(x, gate)) * linear_rows(x, up), down)
