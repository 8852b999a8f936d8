"""The AMX grouped-linear kernel: bf16 weights in AMX tile order, every segment of a step in one call.

Why a kernel of our own (``docs/architecture.md``, "Our own AMX kernel, and why"): a decode step of an MoE model is
memory-bound, and its expert work is many small matmuls (one per expert and projection, a few rows
each). One oneDNN call per weight, even prepacked (:class:`~moeyard.model.cpu_matmul.PackedLinear`),
leaves the step far from the memory's bandwidth (call overhead, threads joined per call, and a short
matmul never reaching full speed). ``csrc/amx_grouped_linear.cpp`` runs every (segment, 32-column
block) pair of a layer's projection in one parallel loop of AMX tile multiply-adds over the weights in
the exact order the tiles read them: the engine's decode runs 1.17-1.26x faster than on prepacked
oneDNN (``bench/bench_engine.py --also packed``, ``docs/benchmarks.md``).

It is also batch-invariant by construction: a row's output is the sum of its K chunks in order, in
fp32, rounded once, whatever else is in the call, so the deterministic mode needs no fixed-size calls
(:mod:`moeyard.model.batch_invariant`) where it runs.

Built at first use with the installed torch (``torch.utils.cpp_extension.load``, ninja and the system's
C++ compiler) into ``$MOEYARD_CACHE_DIR/kernels`` (default ``~/.cache/moeyard/kernels``), keyed by the
torch version; later processes load the cached library. Never built at install. Where AMX is missing
or the build fails, :func:`unavailable` says why and the engine keeps the oneDNN path. The torch path
is the reference in ``tests/model/test_amx.py``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BLOCK = 32
"""Output columns per weight block and inputs per K chunk: both dimensions must be multiples of it."""

STALE_LOCK_S = 300.0
"""A build lock older than this (a build takes ~10 s) was left by a process that died building."""

_SOURCE = Path(__file__).with_name("csrc") / "amx_grouped_linear.cpp"
_CFLAGS = ["-O3", "-fopenmp", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]


def cache_dir() -> Path:
    """Where built kernels are kept: ``$MOEYARD_CACHE_DIR/kernels/torch-VERSION`` (default under
    ``~/.cache/moeyard``)."""
    root = Path(os.environ.get("MOEYARD_CACHE_DIR") or Path.home() / ".cache" / "moeyard")
    return root / "kernels" / f"torch-{torch.__version__.replace('+', '-')}"


def _ninja_on_path() -> bool:
    if shutil.which("ninja"):
        return True
    try:  # the ninja wheel (a dependency) puts its binary here, which is on PATH only in an activated venv
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def clear_stale_lock(build: Path, now: float | None = None) -> bool:
    """Remove torch's build lock in ``build`` when older than :data:`STALE_LOCK_S`: a process killed while
    building leaves it, and every later load would wait on it forever. True when one was removed."""
    lock = build / "lock"
    try:
        if (time.time() if now is None else now) - lock.stat().st_mtime <= STALE_LOCK_S:
            return False
    except FileNotFoundError:
        return False
    log.warning("removing a stale kernel build lock %s", lock)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def unavailable() -> str | None:
    """None once the kernel is built and loaded in this process, else why it cannot run here."""
    if not (torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported()):
        return "this CPU has no AMX-BF16 tiles"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (the CPU's bf16 support is probed through it)"
    if not _ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    if shutil.which(cxx := os.environ.get("CXX", "c++")) is None:
        return f"no C++ compiler ({cxx}) to build the kernel with"
    from torch.utils import cpp_extension

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(build)
    try:
        cpp_extension.load(name="moeyard_amx", sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False,
                           verbose=False)
    except Exception as e:  # a failed build must not take the engine down: the oneDNN path serves
        log.warning("the AMX kernel did not build (%s); CPU matmuls stay on oneDNN", e)
        return f"building the AMX kernel failed: {e}"
    return None


def fits(out_features: int, in_features: int) -> bool:
    """Whether a weight ``[out_features, in_features]`` has the kernel's block shape (both multiples of 32)."""
    return out_features > 0 and in_features > 0 and out_features % BLOCK == 0 and in_features % BLOCK == 0


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """``w [N, K]`` bf16 -> ``[N/32, K/32, 2, 16, 16, 2]``: for output block ``j`` and K chunk ``c``, two
    AMX B tiles (16 rows of 64 bytes); tile ``t`` row ``r`` holds outputs ``32j + 16t ..+16`` at inputs
    ``32c + 2r`` and ``32c + 2r + 1``, interleaved. A block's tiles are contiguous, in K order."""
    n, k = w.shape
    if not fits(n, k):
        raise ValueError(f"the AMX kernel needs both weight dimensions to be multiples of {BLOCK}, got {n}x{k}")
    return w.reshape(n // BLOCK, 2, 16, k // BLOCK, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def pack_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """``w13 [2I, K]`` bf16 (gate rows first, then up) -> :func:`pack_weight` of its rows reordered so that
    output block ``j``'s two tiles are gate rows ``16j ..+16`` and up rows ``16j ..+16``: what
    :func:`grouped_linear` with ``swiglu`` reads."""
    n, k = w13.shape
    if not fits(n, k):
        raise ValueError(f"the AMX kernel needs both weight dimensions to be multiples of {BLOCK}, got {n}x{k}")
    inter = n // 2
    gate, up = w13[:inter].reshape(inter // 16, 16, k), w13[inter:].reshape(inter // 16, 16, k)
    return pack_weight(torch.stack([gate, up], dim=1).reshape(n, k))


def grouped_linear(x: torch.Tensor, counts: list[int], weights: list[torch.Tensor], *, swiglu: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [N, K]`` bf16, segment ``s`` its next ``counts[s]`` rows, times ``weights[s]``
    (:func:`pack_weight` ``([N_out, K])``) -> ``[N, N_out]`` bf16 (fp32 sums, rounded once).

    ``swiglu``: the weights are :func:`pack_gate_up` ``([2I, K])`` and the result is ``[N, I]``,
    ``silu(gate) * up`` from the fp32 sums, rounded once. ``out``: a contiguous bf16 tensor of the
    result's shape to write into (a scratch buffer the caller keeps); returned. RuntimeError where the
    kernel cannot run (:func:`unavailable` says why)."""
    if (why := unavailable()) is not None:
        raise RuntimeError(f"the AMX kernel cannot run here: {why}")
    return torch.ops.moeyard_amx.grouped_linear(x if x.is_contiguous() else x.contiguous(), counts, weights,
                                                swiglu, out)


class AmxLinear:
    """A linear weight ``[N, K]`` in the kernel's tile order; ``self(x [T, K], bias [N]) -> [T, N]``.

    Built once from the plain bf16 weight (which it does not keep; ``shape``, ``dtype`` and ``nbytes``
    are the plain weight's). A bias is added to the rounded product (one more bf16 rounding than a
    fused bias; within bf16 tolerance of torch's ``F.linear``).

    ``gate_up``: the weight is a SwiGLU's gate and up projections stacked (``[2I, K]``, gate first), packed
    by :func:`pack_gate_up` for :func:`grouped_linear`'s ``swiglu`` (which computes the activation
    ``silu(gate) * up`` ``[T, I]``); such a weight is not called as a plain linear."""

    __slots__ = ("packed", "shape", "dtype", "nbytes", "gate_up")

    def __init__(self, weight: torch.Tensor, gate_up: bool = False):
        if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
            raise ValueError(f"AmxLinear needs a 2-D bfloat16 CPU weight, got {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        self.packed = pack_gate_up(weight.detach()) if gate_up else pack_weight(weight.detach())
        self.gate_up = gate_up
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.nbytes = weight.nbytes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate_up:
            raise TypeError("a gate_up AmxLinear is packed for the SwiGLU activation: use "
                            "grouped_linear(..., swiglu=True)")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = grouped_linear(x2, [x2.shape[0]], [self.packed])
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.shape[0])

    def __repr__(self) -> str:
        return f"AmxLinear(shape={tuple(self.shape)}, dtype={self.dtype}{', gate_up' if self.gate_up else ''})"
