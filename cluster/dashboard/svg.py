"""SVG building blocks of the dashboard's charts: colours, scales, ticks, a plot frame with axes, lines.

Pure string building with the standard library; every fragment is well-formed XML.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from html import escape
from itertools import pairwise

__all__ = [
    "FAILED_COLOR",
    "HEAT_STOPS",
    "KIND_COLORS",
    "PALETTE",
    "TIME_STEPS",
    "Frame",
    "heat_color",
    "label_step",
    "linear",
    "num",
    "polyline",
    "segments",
    "svg_open",
    "time_ticks",
    "value_ticks",
]

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
"""Categorical colours: shard ``i`` / layer ``l`` uses ``PALETTE[i % 10]``."""
HEAT_STOPS = [(0.0, (255, 247, 236)), (0.5, (253, 141, 60)), (1.0, (127, 0, 0))]
"""Sequential scale of the heatmap: near-white -> orange -> dark red."""
KIND_COLORS = {"rebalance": "#1f77b4", "scale_up": "#2ca02c", "scale_down": "#9467bd",
               "skip": "#aaaaaa", "reconcile": "#8c564b", "republish": "#17becf"}
"""Colour of each autoscaler event kind."""
FAILED_COLOR = "#d62728"
"""Colour of a failed autoscaler action (``*_failed``)."""
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
"""Candidate spacings (seconds) of time-axis ticks."""


def num(x: float) -> str:
    """A coordinate for SVG attributes: at most 2 decimals, no trailing zeros."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def heat_color(frac: float) -> str:
    """Colour of a heatmap cell at ``frac`` (0..1, clamped) of the maximum rate, as ``#rrggbb``."""
    f = min(1.0, max(0.0, frac if math.isfinite(frac) else 0.0))
    for (f0, c0), (f1, c1) in pairwise(HEAT_STOPS):
        if f <= f1:
            t = (f - f0) / (f1 - f0)
            rgb = [round(a + (b - a) * t) for a, b in zip(c0, c1)]
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#{:02x}{:02x}{:02x}".format(*HEAT_STOPS[-1][1])


# --------------------------------------------------------------------------- scales and ticks


def linear(d0: float, d1: float, r0: float, r1: float) -> Callable[[float], float]:
    """Linear map of the domain ``[d0, d1]`` onto the range ``[r0, r1]`` (a constant for an empty domain)."""
    if d1 == d0:
        return lambda v: (r0 + r1) / 2.0
    k = (r1 - r0) / (d1 - d0)
    return lambda v: r0 + (v - d0) * k


def _nice_step(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= ``x`` (``x > 0``)."""
    if x <= 0 or not math.isfinite(x):
        return 1.0
    mag = 10.0 ** math.floor(math.log10(x))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= x * (1 - 1e-9):
            return m * mag
    return 10.0 * mag


def value_ticks(hi: float, n: int = 4) -> tuple[float, list[float]]:
    """A nice upper bound >= ``hi`` and the ticks ``0, step, ..., top`` (about ``n`` steps)."""
    step = _nice_step(hi / n if hi > 0 else 1.0 / n)
    count = max(1, math.ceil(hi / step - 1e-9)) if hi > 0 else n
    return step * count, [step * i for i in range(count + 1)]


def time_ticks(lo: float, hi: float, now: float, max_ticks: int = 6) -> list[tuple[float, str]]:
    """Ticks ``(unix time, label)`` at whole steps before ``now`` inside ``[lo, hi]``: ``"-120 s"`` ... ``"now"``."""
    span = max(now - lo, 1e-9)
    step = next((s for s in TIME_STEPS if span / s <= max_ticks), TIME_STEPS[-1])
    ticks = []
    k = 0
    while now - k * step >= lo - 1e-6:
        t = now - k * step
        if t <= hi + 1e-6:
            ticks.append((t, "now" if k == 0 else f"-{k * step:g} s"))
        k += 1
    return ticks[::-1]


def label_step(cell: float, min_px: float) -> int:
    """Label every n-th row/column (n a power of two) so that labels are >= ``min_px`` apart."""
    n = 1
    while n * cell < min_px:
        n *= 2
    return n


# --------------------------------------------------------------------------- frame and lines


class Frame:
    """A chart's plot area inside an SVG of ``width`` x ``height`` px with x/y domains.

    ``x(v)`` / ``y(v)`` map data to pixels; :meth:`axes` draws grid lines, tick labels
    and the axis lines.
    """

    def __init__(self, width: float, height: float, xdom: tuple[float, float], ydom: tuple[float, float],
                 margin: tuple[float, float, float, float] = (20, 10, 22, 46)):
        top, right, bottom, left = margin
        self.width, self.height = width, height
        self.left, self.right = left, width - right
        self.top, self.bottom = top, height - bottom
        self.xdom, self.ydom = xdom, ydom
        self.x = linear(xdom[0], xdom[1], self.left, self.right)
        self.y = linear(ydom[0], ydom[1], self.bottom, self.top)

    def contains_x(self, v: float) -> bool:
        return self.xdom[0] <= v <= self.xdom[1]

    def axes(self, xticks: Iterable[tuple[float, str]], yticks: Iterable[tuple[float, str]]) -> str:
        """Grid lines and labels for ``(value, label)`` ticks on both axes."""
        parts = []
        for v, label in yticks:
            py = num(self.y(v))
            parts.append(f'<line class="grid" x1="{num(self.left)}" x2="{num(self.right)}" y1="{py}" y2="{py}" '
                         f'stroke="#e3e3e3" stroke-width="1"/>')
            parts.append(f'<text class="tick" x="{num(self.left - 4)}" y="{py}" text-anchor="end" '
                         f'dominant-baseline="middle" font-size="10" fill="#555">{escape(label)}</text>')
        for v, label in xticks:
            px = num(self.x(v))
            parts.append(f'<line class="grid" x1="{px}" x2="{px}" y1="{num(self.top)}" y2="{num(self.bottom)}" '
                         f'stroke="#eeeeee" stroke-width="1"/>')
            parts.append(f'<text class="tick" x="{px}" y="{num(self.bottom + 14)}" text-anchor="middle" '
                         f'font-size="10" fill="#555">{escape(label)}</text>')
        parts.append(f'<polyline class="axis" points="{num(self.left)},{num(self.top)} {num(self.left)},'
                     f'{num(self.bottom)} {num(self.right)},{num(self.bottom)}" fill="none" stroke="#888"/>')
        return "".join(parts)


def svg_open(width: float, height: float, cls: str, extra: str = "") -> str:
    """An ``<svg>`` start tag with a viewBox, scaled down by CSS on narrow screens."""
    return (f'<svg class="{cls}" width="{num(width)}" height="{num(height)}" '
            f'viewBox="0 0 {num(width)} {num(height)}" role="img"{extra}>')


def segments(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Split ``(x, y)`` points into runs without ``None`` (a ``None`` breaks the line)."""
    runs: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    for x, y in points:
        if y is None:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append((x, y))
    if cur:
        runs.append(cur)
    return runs


def polyline(frame: Frame, run: Sequence[tuple[float, float]], attrs: str, color: str,
             width: float = 1.5, dash: str | None = None) -> str:
    """One ``<polyline>`` through ``run`` (a lone point becomes a small circle with the same attrs)."""
    if len(run) == 1:
        (x, y), = run
        return (f'<circle {attrs} cx="{num(frame.x(x))}" cy="{num(frame.y(y))}" r="{num(width + 1)}" '
                f'fill="{color}"/>')
    pts = " ".join(f"{num(frame.x(x))},{num(frame.y(y))}" for x, y in run)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<polyline {attrs} points="{pts}" fill="none" stroke="{color}" stroke-width="{num(width)}" '
            f'stroke-linejoin="round"{dash_attr}/>')
