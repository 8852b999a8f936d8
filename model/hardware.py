"""This machine's roofline figures, measured: peak matmul FLOP/s per dtype and memory bandwidth.

:func:`measure_local` times large square matmuls (the best of several, so a noisy neighbour costs
repeats, not the figure) and streaming reads of a buffer far larger than the caches (``sum``; a copy is
measured too, counted as read + write). :func:`local_hardware` caches the result per CPU model, thread
count and torch version under ``~/.cache/moeyard/hardware`` (``MOEYARD_CACHE_DIR`` moves it), since the
measurement takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from moeyard.model.roofline import Hardware

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), 0 when unknown."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


def _best_seconds(fn, min_repeats: int, budget_s: float) -> float:
    fn()  # warm-up (oneDNN compiles its kernel, pages fault in)
    best = float("inf")
    start = time.perf_counter()
    n = 0
    while n < min_repeats or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
        if n >= 50:
            break
    return best


def matmul_flops(dtype: str, n: int = 2048, min_repeats: int = 3, budget_s: float = 1.0) -> float:
    """Peak FLOP/s of an ``[n, n] @ [n, n]`` matmul in ``dtype`` on this process's threads."""
    dt = _DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    out = torch.empty(n, n, dtype=dt)
    return 2.0 * n ** 3 / _best_seconds(lambda: torch.matmul(a, b, out=out), min_repeats, budget_s)


def read_bandwidth(nbytes: int = 512 << 20, min_repeats: int = 5, budget_s: float = 1.0) -> float:
    """Bytes/s of streaming reads (a ``sum`` over a float32 buffer of ``nbytes``)."""
    x = torch.ones(nbytes // 4)
    return nbytes / _best_seconds(lambda: x.sum(), min_repeats, budget_s)


def copy_bandwidth(nbytes: int = 256 << 20, min_repeats: int = 5, budget_s: float = 1.0) -> float:
    """Bytes/s moved by a copy of ``nbytes`` (read + write counted)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), min_repeats, budget_s)


def measure_local(quick: bool = False) -> Hardware:
    """Measure this machine (``quick``: small sizes, for tests; the figures are then rougher)."""
    # the bandwidth buffers must dwarf the last-level cache (480 MiB on some Xeons), or they measure it
    n, buf = (256, 32 << 20) if quick else (2048, max(512 << 20, 2 * last_level_cache_bytes()))
    budget = 0.05 if quick else 1.0
    flops = {name: matmul_flops(name, n, 3, budget) for name in _DTYPES}
    read = read_bandwidth(buf, 3 if quick else 5, budget)
    copy = copy_bandwidth(buf // 2, 3 if quick else 5, budget)
    return Hardware(name="local", peak_flops=flops, memory_bandwidth=max(read, copy),
                    source=f"measured on {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
                           + (" (quick)" if quick else ""),
                    details={"read_bandwidth": read, "copy_bandwidth": copy, "matmul_n": float(n),
                             "bandwidth_buffer_bytes": float(buf),
                             "last_level_cache_bytes": float(last_level_cache_bytes())})


def _cache_dir() -> Path:
    return Path(os.environ.get("MOEYARD_CACHE_DIR", Path.home() / ".cache" / "moeyard")) / "hardware"


def local_hardware(refresh: bool = False) -> Hardware:
    """:func:`measure_local`, cached per CPU model, thread count and torch version."""
    key = f"{cpu_model()}|{torch.get_num_threads()}|{torch.__version__}"
    path = _cache_dir() / f"local-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if not refresh and path.is_file():
        try:
            return Hardware(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # a damaged cache entry is measured again
    hw = measure_local()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(hw), indent=1))
    tmp.replace(path)
    return hw
