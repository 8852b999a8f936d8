"""Text formatting of the dashboard's figures: parameter counts, bytes, durations, rates, clock times.

Pure functions of the standard library; a missing value (``None``) shows as :data:`DASH`.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Callable, Sequence

__all__ = [
    "DASH",
    "arrow",
    "finite",
    "fmt_bytes",
    "fmt_clock",
    "fmt_frac",
    "fmt_params",
    "fmt_rate",
    "fmt_seconds",
    "pct",
]

DASH = "–"
"""Shown for a missing value."""


def _sig3(x: float) -> str:
    """About 3 significant digits, no exponent: ``7.5 -> "7.50"``, ``12.34 -> "12.3"``, ``198.2 -> "198"``."""
    for digits, limit in ((2, 10.0), (1, 100.0)):
        s = f"{x:.{digits}f}"
        if abs(float(s)) < limit:
            return s
    return f"{x:.0f}"


def _scaled(x: float, base: float, units: Sequence[str]) -> tuple[float, str]:
    """``x`` divided by the largest power of ``base`` that keeps it >= 1, and that power's unit."""
    i = 0
    while i + 1 < len(units) and abs(x) >= base ** (i + 1) * 0.9995:
        i += 1
    return x / base ** i, units[i]


def fmt_params(n: float | None) -> str:
    """Parameter count: ``7.5e9 -> "7.50 B"``, ``1.23e7 -> "12.3 M"``, ``512 -> "512"``."""
    if n is None:
        return DASH
    v, unit = _scaled(float(n), 1000.0, ["", "K", "M", "B", "T"])
    return f"{n:.0f}" if unit == "" else f"{_sig3(v)} {unit}"


def fmt_bytes(n: float | None) -> str:
    """Bytes in binary units: ``207618048 -> "198 MiB"``, ``1536 -> "1.50 KiB"``, ``12 -> "12 B"``."""
    if n is None:
        return DASH
    v, unit = _scaled(float(n), 1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
    return f"{n:.0f} B" if unit == "B" else f"{_sig3(v)} {unit}"


def fmt_seconds(s: float | None) -> str:
    """A duration: ``0.123 -> "123 ms"``, ``2.5 -> "2.50 s"``, ``900 -> "15.0 min"``."""
    if s is None or not math.isfinite(s):
        return DASH
    if abs(s) < 1.0:
        return f"{_sig3(s * 1000.0)} ms"
    if abs(s) < 600.0:
        return f"{_sig3(s)} s"
    if abs(s) < 36000.0:
        return f"{_sig3(s / 60.0)} min"
    return f"{_sig3(s / 3600.0)} h"


def fmt_rate(x: float | None) -> str:
    """Tokens per second with one decimal: ``123.44 -> "123.4"``."""
    return DASH if x is None else f"{x:.1f}"


def fmt_frac(x: float | None) -> str:
    """A 0..1 figure (balancedness) with 3 decimals, ``"–"`` for ``None``."""
    return DASH if x is None else f"{x:.3f}"


def fmt_clock(t: float) -> str:
    """Unix seconds as local ``HH:MM:SS``."""
    return _time.strftime("%H:%M:%S", _time.localtime(t))


def arrow(a: object, b: object, fmt: Callable[[object], str] = lambda v: DASH if v is None else str(v)) -> str:
    """``"a → b"`` with each side formatted (``"–"`` for ``None``)."""
    return f"{fmt(a)} → {fmt(b)}"


def pct(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``: ``"16%"`` (one decimal under 10%)."""
    if whole <= 0:
        return DASH
    p = 100.0 * part / whole
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def finite(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` when missing or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
