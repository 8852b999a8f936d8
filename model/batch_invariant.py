"""Batch-invariant math: a row's result that does not depend on what else shares its batch.

A matmul kernel picks its blocking, and with it the order in which a row's products are summed, from the
shapes of the call; oneDNN and MKL pick differently for 8 rows than for 64. So the same token can get
different bits depending on how many other tokens share its step, its expert's segment or its prefill
chunk, and greedy outputs drift apart after a near tie (the batch-invariant inference vLLM and SGLang
added in 2025). In this mode every row-parallel matmul runs on chunks of exactly :data:`ROWS` rows (the
last one zero-padded): each row then always goes through a call of one shape, whose per-row sums do not
depend on the other rows' values. Attention gets the same treatment in
:mod:`moeyard.attention.paged` (fixed query and key tiles). Everything else a row goes through is
row-local (norms, RoPE, activations, the gate's top-k) or already in a fixed order (the combine).

The mode is a context (:func:`batch_invariant`), set by the engine around each step and by an expert
shard around each compute, so the math functions keep their signatures.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

ROWS = 32
"""Rows of every matmul call in batch-invariant mode."""

_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("moeyard_batch_invariant", default=False)


@contextmanager
def batch_invariant(on: bool = True) -> Iterator[None]:
    """Run the body with batch-invariant math (``on``) or without."""
    token = _ON.set(on)
    try:
        yield
    finally:
        _ON.reset(token)


def enabled() -> bool:
    """Whether this context runs batch-invariant math."""
    return _ON.get()


def fixed_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """``fn`` (row-parallel: ``[R, ...] -> [R, ...]``) applied to ``x [T, ...]`` in calls of exactly ``rows``
    rows, the last chunk zero-padded; ``[T, ...]``."""
    t = x.shape[0]
    if t == rows:
        return fn(x)
    outs = []
    for s in range(0, t, rows):
        chunk = x[s:s + rows]
        n = chunk.shape[0]
        if n < rows:
            chunk = torch.cat([chunk, chunk.new_zeros((rows - n,) + tuple(chunk.shape[1:]))])
        y = fn(chunk)
        outs.append(y[:n] if n < rows else y)
    if not outs:
        return fn(x.new_zeros((rows,) + tuple(x.shape[1:])))[:0]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def bmm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a [G, T, K], b [G, K, N])`` -> ``[G, T, N]``, in calls of :data:`ROWS` rows of ``T`` when
    the mode is on."""
    if not enabled():
        return torch.bmm(a, b)
    return fixed_rows(lambda c: torch.bmm(c.transpose(0, 1), b).transpose(0, 1), a.transpose(0, 1)).transpose(0, 1)
