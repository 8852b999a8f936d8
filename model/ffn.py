"""Grouped SwiGLU over physical slots (pure tensor math).

Tokens arrive already sorted by slot; each slot's rows are one contiguous
segment. Two ways to run them, the same numbers up to rounding:

* :func:`grouped_swiglu` (the loop): one matmul pair per slot that received tokens;
  the reference in tests, and what runs on the CPU, where torch's grouped GEMM calls
  the same per-group kernels (measured no faster, docs/benchmarks.md); with weights in
  the AMX kernel's order (:class:`~moeyard.model.amx.AmxLinear`) all slots run in one
  kernel call per projection instead;
* :func:`grouped_swiglu_gemm`: one grouped GEMM per projection for all slots
  (``torch.nn.functional.grouped_mm``) over the shard's stacked ``[C, 2I, D]`` /
  ``[C, D, I]`` weights, where the device and dtype support it (CUDA bf16).

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

import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moeyard.model import amx, batch_invariant
from moeyard.model.amx import AmxLinear
from moeyard.model.cpu_matmul import Weight, is_batch_invariant, linear
from moeyard.model.devices import host_tensor_to


def grouped_swiglu(x: torch.Tensor, counts: list[int] | torch.Tensor, w13: torch.Tensor | Sequence[Weight],
                   w2: torch.Tensor | Sequence[Weight], slot_index: list[int] | None = None) -> torch.Tensor:
    """Apply slot ``s``'s expert FFN to its segment of ``x``.

    Args:
        x: ``[N, D]`` tokens sorted by slot (segment ``s`` has ``counts[s]`` rows).
        counts: ``[S]`` rows per slot, summing to ``N``.
        w13: ``[S, 2I, D]`` gate and up projections stacked (gate first), or a
            sequence of ``S`` weights ``[2I, D]`` (tensors, or :class:`PackedLinear` for oneDNN).
        w2: ``[S, D, I]`` down projections, or ``S`` weights ``[D, I]``.
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
    if not slot_index:
        return out
    inter = w2[slot_index[0]].shape[-1]   # (a packed shard's free rows are None)
    if isinstance(w13[slot_index[0]], AmxLinear) and isinstance(w2[slot_index[0]], AmxLinear):
        # one kernel call per projection for every segment; batch-invariant as it is
        gate_up = [w13[w].packed for w in slot_index]
        if w13[slot_index[0]].gate_up:  # the activation computed by the kernel, into this thread's scratch
            act = amx.grouped_linear(x, counts, gate_up, swiglu=True, out=_scratch(x.shape[0], inter))
        else:
            h = amx.grouped_linear(x, counts, gate_up)
            act = F.silu(h[:, :inter]) * h[:, inter:]
        return amx.grouped_linear(act, counts, [w2[w].packed for w in slot_index])
    if batch_invariant.enabled():  # each segment in calls of a fixed row count (model/batch_invariant.py)
        start = 0
        for s, n in enumerate(counts):
            if n:
                w = slot_index[s]

                def expert(seg, w=w):
                    h = linear(seg, w13[w])
                    return linear(F.silu(h[:, :inter]) * h[:, inter:], w2[w])
                out[start:start + n] = batch_invariant.fixed_rows(expert, x[start:start + n])
            start += n
        return out
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
        h = linear(seg, w13[w])
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = linear(act, w2[w])
        out[start:start + n] = y[:n] if m != n else y
        start += n
    return out


_SCRATCH = threading.local()


def _scratch(rows: int, cols: int) -> torch.Tensor:
    """A ``[rows, cols]`` bf16 CPU buffer of the calling thread's, reused from call to call (grown when
    short): a prefill-sized activation allocated afresh would page-fault its megabytes in every call.
    Valid until this thread's next call."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < rows * cols:
        buf = _SCRATCH.buf = torch.empty(rows * cols, dtype=torch.bfloat16)
    return buf[:rows * cols].view(rows, cols)


def grouped_swiglu_gemm(x: torch.Tensor, counts: Sequence[int], w13: torch.Tensor, w2: torch.Tensor,
                        rows: Sequence[int]) -> torch.Tensor:
    """:func:`grouped_swiglu` as two grouped GEMMs over every row of the stacked weights.

    Args:
        x: ``[N, D]`` tokens, segment ``s`` (``counts[s]`` rows) for weights row ``rows[s]``.
        counts: ``[S']`` rows per segment (zeros allowed).
        w13: ``[C, 2I, D]`` stacked gate+up projections; w2: ``[C, D, I]`` stacked down projections.
        rows: ``[S']`` weights row of each segment (any order, repeats allowed).
    Returns ``[N, D]`` in ``x``'s order and dtype. Segments are put in row order first (one gather
    of ``x``, undone on the output), so that each of the ``C`` groups is one contiguous run; rows
    with no tokens are empty groups.
    """
    n, cap = x.shape[0], w13.shape[0]
    if n == 0:
        return torch.empty_like(x)
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    order = sorted(range(len(rows)), key=rows.__getitem__)
    if order != list(range(len(rows))):
        idx = host_tensor_to([i for s in order for i in range(starts[s], starts[s] + counts[s])],
                             torch.int64, x.device)
        xs = x.index_select(0, idx)
    else:
        idx, xs = None, x
    per_row = [0] * cap
    for r, c in zip(rows, counts):
        per_row[r] += c
    ends, acc = [], 0
    for c in per_row:
        acc += c
        ends.append(acc)
    offs = host_tensor_to(ends, torch.int32, x.device)
    inter = w2.shape[-1]
    h = F.grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    y = F.grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2.transpose(1, 2), offs=offs)
    if idx is None:
        return y
    out = torch.empty_like(y)
    out[idx] = y
    return out


_GEMM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


def gemm_shapes_ok(hidden: int, inter: int, dtype: torch.dtype) -> bool:
    """``grouped_mm`` needs every stride a multiple of 16 bytes: ``D`` and ``I`` elements each."""
    return (hidden * dtype.itemsize) % 16 == 0 and (inter * dtype.itemsize) % 16 == 0


def grouped_gemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` runs for ``dtype`` on ``device``'s type here (tried once, on a tiny input,
    against the loop)."""
    key = (device.type, dtype)
    if key not in _GEMM_SUPPORT:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                g = torch.Generator(device="cpu").manual_seed(0)
                # on the CPU explicitly: a probe run under another default device (a test's meta guard)
                # must not cache a wrong answer for the whole process
                x = torch.randn(5, 16, generator=g, device="cpu").to(device=device, dtype=dtype)
                w13 = torch.randn(3, 32, 16, generator=g, device="cpu").to(device=device, dtype=dtype)
                w2 = torch.randn(3, 16, 16, generator=g, device="cpu").to(device=device, dtype=dtype)
                got = grouped_swiglu_gemm(x, [2, 3], w13, w2, [2, 0])
                want = grouped_swiglu(x, [2, 3], w13, w2, [2, 0])
                ok = bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GEMM_SUPPORT[key] = ok
    return _GEMM_SUPPORT[key]


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


def linear_rows(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over ``x [T, K]`` run at :func:`bucket_rows` ``(T)`` rows where that matters (bf16 on
    CPU, see the module docstring): the token count of an engine step varies from step to step, and
    each new count would compile (and keep) another oneDNN kernel. Returns ``[T, N]``."""
    t = x.shape[0]
    if is_batch_invariant(w):  # the AMX kernel: no per-shape code, each row's sum independent of the rest
        return linear(x, w, b)
    if batch_invariant.enabled() and x.dim() == 2:
        return batch_invariant.fixed_rows(lambda c: linear(c, w, b), x)
    if x.dim() != 2 or not uses_row_buckets(x) or bucket_rows(t) == t:
        return linear(x, w, b)
    padded = torch.cat([x, x.new_zeros(bucket_rows(t) - t, x.shape[1])])
    return linear(padded, w, b)[:t]


def swiglu(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
    """Dense SwiGLU MLP: ``x [T, D]``, ``gate/up [I, D]``, ``down [D, I]`` -> ``[T, D]``."""
    return linear_rows(F.silu(linear_rows(x, gate)) * linear_rows(x, up), down)
