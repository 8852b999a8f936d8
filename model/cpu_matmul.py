"""Matmuls of linear layers on the CPU, chosen per instruction-set class.

The instruction-set class (:func:`isa_class`): ``amx`` (AMX-BF16 tiles), ``avx512_bf16``, ``avx512``,
``avx2`` or ``baseline``, from torch's own CPU probes.

The kernels (:data:`MatmulMode`):

* ``packed``: oneDNN with the weight reordered once, at load, into the blocked layout its kernels read
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``: what ``torch.compile`` with
  freezing does for CPU linears). A plain ``x @ w.t()`` in bf16 makes oneDNN copy ``w`` into that
  layout on every call, so a memory-bound decode step reads its weights twice; prepacked, the engine's
  decode runs 1.18-1.25x faster on an AMX Xeon, with bit-identical results (``docs/benchmarks.md``).
  For bf16 where oneDNN computes it natively or with AVX-512 conversions
  (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: AVX-512 and up).
* ``amx``: on CPUs with AMX-BF16 tiles, bf16 weights in the tile order of our own kernel
  (:mod:`moeyard.model.amx`, JIT-built at first use): a layer's experts run in one call per projection,
  streaming the weights nearer the memory's bandwidth than one oneDNN call per expert, and every
  linear's rows are batch-invariant. Weights whose shape it cannot take (a dimension not a multiple of
  32) stay ``packed``.
* ``plain``: torch's matmul. fp32 always runs here (MKL, the kernels ``transformers`` uses, so fp32
  greedy parity stays exact; oneDNN's fp32 sums in another order), and so do fp16 and bf16 on CPUs
  without oneDNN bf16 support (AVX2: torch's own bf16 kernels).

``auto`` picks ``amx`` where it runs (its build included), else ``packed`` where that applies, else
``plain``. The packed weight replaces the plain one (no second copy): :class:`PackedLinear` or
:class:`~moeyard.model.amx.AmxLinear` holds it with its shape and dtype, and :func:`linear` runs any kind.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from moeyard.model import amx
from moeyard.model.amx import AmxLinear

MatmulMode = Literal["auto", "amx", "packed", "plain"]
MATMUL_MODES: tuple[str, ...] = ("auto", "amx", "packed", "plain")
Kernel = Literal["amx", "packed", "plain"]
IsaClass = Literal["amx", "avx512_bf16", "avx512", "avx2", "baseline"]

_PACK_HINT_ROWS = 16
"""The row count oneDNN's reorder is told to expect (measured: the layout serves every row count alike)."""


def isa_class() -> IsaClass:
    """This CPU's class, best first: AMX tiles, AVX-512 with BF16, AVX-512, AVX2, or neither."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    if torch.cpu._is_avx512_supported():
        return "avx512"
    if torch.cpu._is_avx2_supported():
        return "avx2"
    return "baseline"


def packed_supported(dtype: torch.dtype) -> str | None:
    """None when ``dtype`` weights can be prepacked for oneDNN on this CPU, else why not."""
    if dtype == torch.float32:
        return "float32 runs on MKL's plain kernels (exact parity with transformers)"
    if dtype != torch.bfloat16:
        return f"no packed kernel for {str(dtype).removeprefix('torch.')} (bfloat16 only)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return f"oneDNN has no bfloat16 kernels on this CPU ({isa_class()})"
    return None


def amx_supported(dtype: torch.dtype) -> str | None:
    """None when ``dtype`` weights can run on the AMX kernel here (building it if need be), else why not."""
    if dtype != torch.bfloat16:
        return f"the AMX kernel is bfloat16 only, not {str(dtype).removeprefix('torch.')}"
    return amx.unavailable()


def resolve_matmul(mode: str, dtype: torch.dtype, device: torch.device | str) -> Kernel:
    """The kernel ``mode`` means for ``dtype`` weights on ``device``; ValueError for an unknown mode or a
    forced ``amx`` or ``packed`` that cannot run here (the message says why)."""
    if mode not in MATMUL_MODES:
        raise ValueError(f"matmul must be one of {', '.join(MATMUL_MODES)}, got {mode!r}")
    if mode == "plain":
        return "plain"
    if torch.device(device).type != "cpu":
        if mode != "auto":
            raise ValueError(f"matmul {mode!r} is a CPU kernel; the weights are on {device}")
        return "plain"
    if mode in ("auto", "amx"):
        why = amx_supported(dtype)
        if why is None:
            return "amx"
        if mode == "amx":
            raise ValueError(f"matmul 'amx' cannot run here: {why}")
    why = packed_supported(dtype)
    if why is not None:
        if mode == "packed":
            raise ValueError(f"matmul 'packed' cannot run here: {why}")
        return "plain"
    return "packed"


class PackedLinear:
    """A linear weight ``[N, K]`` in oneDNN's blocked layout; ``self(x [T, K], bias [N]) -> [T, N]``.

    Built once from the plain weight (which it does not keep). ``shape``, ``dtype`` and ``nbytes`` are
    the plain weight's."""

    __slots__ = ("packed", "shape", "dtype", "nbytes")

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear needs a 2-D CPU weight, got {tuple(weight.shape)} on {weight.device}")
        with torch.inference_mode(False):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_HINT_ROWS)
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.nbytes = weight.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x if x.is_contiguous() else x.contiguous(), self.packed, bias,
                                                  "none", [], "")

    def __repr__(self) -> str:
        return f"PackedLinear(shape={tuple(self.shape)}, dtype={self.dtype})"


Weight = torch.Tensor | PackedLinear | AmxLinear
"""A linear layer's weight ``[N, K]``: plain, packed for oneDNN, or in the AMX kernel's tile order."""


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for any kind of weight: ``x [T, K]`` -> ``[T, N]``."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    return w(x, b)


def is_batch_invariant(w: Weight) -> bool:
    """Whether a row's product with ``w`` never depends on the other rows of the call (the AMX kernel)."""
    return isinstance(w, AmxLinear)


def pack(w: torch.Tensor | None, kernel: str, gate_up: bool = False) -> Weight | None:
    """``w`` as the ``kernel`` (``resolve_matmul``'s answer) runs it: in the AMX kernel's order (where
    its shape fits, else packed for oneDNN), packed, or as it is. ``gate_up``: ``w`` is a SwiGLU's gate
    and up projections stacked (``[2I, K]``, gate first); in the AMX kernel's order it is packed for the
    kernel's fused activation (:class:`~moeyard.model.amx.AmxLinear` ``gate_up``)."""
    if w is None or kernel == "plain":
        return w
    if kernel == "amx" and amx.fits(*w.shape):
        return AmxLinear(w, gate_up=gate_up)
    return PackedLinear(w)
