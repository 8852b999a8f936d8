"""Server-rendered panels of the operator dashboard: HTML fragments with inline SVG.

:func:`render_panels` turns one :class:`~cluster.dashboard.state.DashboardState`
into ``{panel name: HTML fragment}``; the dashboard's ``GET /api/panels`` returns
it and the page (``static/dashboard.js``) drops each fragment into its section.
Everything here is pure (no I/O) and uses the standard library only.

Panels (keys of :data:`PANELS`):

* ``heatmap``: routed tokens/s per (MoE layer x logical expert), one
  ``<rect class="cell">`` each, coloured by rate relative to the hottest cell;
  hot cells outlined, cold cells hatched;
* ``shards``: per MoE layer, tokens/s per shard over the load windows, and the
  balancedness of every layer over time with the autoscaler's actions marked;
* ``placement``: per MoE layer, shard x slot grid of the logical expert in each slot;
* ``timeline``: the autoscaler's events, newest first;
* ``serving``: replica and shard health;
* ``economics``: total vs active parameters and the dense-equivalent estimate.

Every string that comes from the state is escaped with :func:`html.escape`; the
SVG fragments are well-formed XML. Shapes use ``L`` MoE layers, ``E`` logical
experts, ``P`` physical slots, ``N`` shards, ``W`` load windows.
"""

from __future__ import annotations

import math
import time as _time
from collections.abc import Callable, Iterable, Sequence
from html import escape
from itertools import pairwise

from cluster.dashboard.state import (
    DashboardState,
    Economics,
    EventView,
    HeatmapView,
    PlacementView,
    ReplicaHealth,
    ServingView,
    ShardHealth,
    ShardSeries,
)

__all__ = [
    "PANELS",
    "fmt_bytes",
    "fmt_clock",
    "fmt_frac",
    "fmt_params",
    "fmt_rate",
    "fmt_seconds",
    "heat_color",
    "render_economics",
    "render_heatmap",
    "render_panels",
    "render_placement",
    "render_serving",
    "render_shards",
    "render_timeline",
]

DASH = "–"
"""Shown for a missing value."""
BALANCED_REF = 0.9
"""Reference line on the balancedness chart (the autoscaler's default threshold)."""
MARKED_KINDS = ("rebalance", "scale_up", "scale_down")
"""Event kinds drawn as vertical lines on the balancedness chart (``*_failed`` too, dashed)."""
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
"""Categorical colours: shard ``i`` / layer ``l`` uses ``PALETTE[i % 10]``."""
HEAT_STOPS = [(0.0, (255, 247, 236)), (0.5, (253, 141, 60)), (1.0, (127, 0, 0))]
"""Sequential scale of the heatmap: near-white -> orange -> dark red."""
KIND_COLORS = {"rebalance": "#1f77b4", "scale_up": "#2ca02c", "scale_down": "#9467bd",
               "skip": "#aaaaaa", "reconcile": "#8c564b", "republish": "#17becf"}
FAILED_COLOR = "#d62728"


# --------------------------------------------------------------------------- number formatting


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


def _arrow(a: object, b: object, fmt: Callable[[object], str] = lambda v: DASH if v is None else str(v)) -> str:
    """``"a → b"`` with each side formatted (``"–"`` for ``None``)."""
    return f"{fmt(a)} → {fmt(b)}"


def _num(x: float) -> str:
    """A coordinate for SVG attributes: at most 2 decimals, no trailing zeros."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _finite(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` when missing or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- scales and axes


def heat_color(frac: float) -> str:
    """Colour of a heatmap cell at ``frac`` (0..1, clamped) of the maximum rate, as ``#rrggbb``."""
    f = min(1.0, max(0.0, frac if math.isfinite(frac) else 0.0))
    for (f0, c0), (f1, c1) in pairwise(HEAT_STOPS):
        if f <= f1:
            t = (f - f0) / (f1 - f0)
            rgb = [round(a + (b - a) * t) for a, b in zip(c0, c1)]
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#{:02x}{:02x}{:02x}".format(*HEAT_STOPS[-1][1])


def _linear(d0: float, d1: float, r0: float, r1: float) -> Callable[[float], float]:
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


def _value_ticks(hi: float, n: int = 4) -> tuple[float, list[float]]:
    """A nice upper bound >= ``hi`` and the ticks ``0, step, ..., top`` (about ``n`` steps)."""
    step = _nice_step(hi / n if hi > 0 else 1.0 / n)
    count = max(1, math.ceil(hi / step - 1e-9)) if hi > 0 else n
    return step * count, [step * i for i in range(count + 1)]


TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)


def _time_ticks(lo: float, hi: float, now: float, max_ticks: int = 6) -> list[tuple[float, str]]:
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


def _label_step(cell: float, min_px: float) -> int:
    """Label every n-th row/column (n a power of two) so that labels are >= ``min_px`` apart."""
    n = 1
    while n * cell < min_px:
        n *= 2
    return n


class _Frame:
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
        self.x = _linear(xdom[0], xdom[1], self.left, self.right)
        self.y = _linear(ydom[0], ydom[1], self.bottom, self.top)

    def contains_x(self, v: float) -> bool:
        return self.xdom[0] <= v <= self.xdom[1]

    def axes(self, xticks: Iterable[tuple[float, str]], yticks: Iterable[tuple[float, str]]) -> str:
        """Grid lines and labels for ``(value, label)`` ticks on both axes."""
        parts = []
        for v, label in yticks:
            py = _num(self.y(v))
            parts.append(f'<line class="grid" x1="{_num(self.left)}" x2="{_num(self.right)}" y1="{py}" y2="{py}" '
                         f'stroke="#e3e3e3" stroke-width="1"/>')
            parts.append(f'<text class="tick" x="{_num(self.left - 4)}" y="{py}" text-anchor="end" '
                         f'dominant-baseline="middle" font-size="10" fill="#555">{escape(label)}</text>')
        for v, label in xticks:
            px = _num(self.x(v))
            parts.append(f'<line class="grid" x1="{px}" x2="{px}" y1="{_num(self.top)}" y2="{_num(self.bottom)}" '
                         f'stroke="#eeeeee" stroke-width="1"/>')
            parts.append(f'<text class="tick" x="{px}" y="{_num(self.bottom + 14)}" text-anchor="middle" '
                         f'font-size="10" fill="#555">{escape(label)}</text>')
        parts.append(f'<polyline class="axis" points="{_num(self.left)},{_num(self.top)} {_num(self.left)},'
                     f'{_num(self.bottom)} {_num(self.right)},{_num(self.bottom)}" fill="none" stroke="#888"/>')
        return "".join(parts)


def _svg_open(width: float, height: float, cls: str, extra: str = "") -> str:
    """An ``<svg>`` start tag with a viewBox, scaled down by CSS on narrow screens."""
    return (f'<svg class="{cls}" width="{_num(width)}" height="{_num(height)}" '
            f'viewBox="0 0 {_num(width)} {_num(height)}" role="img"{extra}>')


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
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


def _polyline(frame: _Frame, run: Sequence[tuple[float, float]], attrs: str, color: str,
              width: float = 1.5, dash: str | None = None) -> str:
    """One ``<polyline>`` through ``run`` (a lone point becomes a small circle with the same attrs)."""
    if len(run) == 1:
        (x, y), = run
        return (f'<circle {attrs} cx="{_num(frame.x(x))}" cy="{_num(frame.y(y))}" r="{_num(width + 1)}" '
                f'fill="{color}"/>')
    pts = " ".join(f"{_num(frame.x(x))},{_num(frame.y(y))}" for x, y in run)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<polyline {attrs} points="{pts}" fill="none" stroke="{color}" stroke-width="{_num(width)}" '
            f'stroke-linejoin="round"{dash_attr}/>')


# --------------------------------------------------------------------------- shared pieces


def _empty(state: DashboardState, what: str) -> str:
    """The explanatory text of an empty panel: ``what`` plus the state's notes (escaped)."""
    notes = list(state.notes)
    if not state.redis_ok and state.redis_error:
        notes.append(f"Redis: {state.redis_error}")
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f'<div class="empty"><p>{escape(what)}</p>' + (f'<ul class="notes">{items}</ul>' if items else "") + "</div>"


def _time_domain(state: DashboardState, times: Sequence[float]) -> tuple[float, float]:
    """``[now - lookback, now]``, widened to include every window start in ``times``."""
    now = state.time
    lo = now - state.lookback_s if state.lookback_s > 0 else (min(times) if times else now - 60.0)
    if times:
        lo = min(lo, min(times))
        now = max(now, max(times))
    if now - lo < 1.0:
        lo = now - 1.0
    return lo, now


def _table(headers: Sequence[str], rows: Iterable[str], cls: str) -> str:
    """A ``<table>`` with a header row of (already safe) ``headers`` and pre-rendered ``<tr>`` rows."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _td(text: str, cls: str = "") -> str:
    """A cell with already-escaped ``text``."""
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


# --------------------------------------------------------------------------- heatmap


def _heatmap_defs() -> str:
    """The hatch pattern of cold cells and the legend's gradient."""
    stops = "".join(f'<stop offset="{f:g}" stop-color="{heat_color(f)}"/>' for f, _ in HEAT_STOPS)
    return ('<defs><pattern id="hm-cold" width="5" height="5" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="5" height="5" fill="#d4d4d4"/>'
            '<line x1="0" y1="0" x2="0" y2="5" stroke="#7a7a7a" stroke-width="2"/></pattern>'
            f'<linearGradient id="hm-scale" x1="0" x2="1" y1="0" y2="0">{stops}</linearGradient></defs>')


def _cell_state(layer: int, expert: int, hot: set[tuple[int, int]], cold: set[tuple[int, int]]) -> str:
    """``"cold"`` (takes precedence: no tokens now), ``"hot"`` or ``"normal"``."""
    if (layer, expert) in cold:
        return "cold"
    return "hot" if (layer, expert) in hot else "normal"


def _heat_cells(hm: HeatmapView, x0: float, y0: float, cw: float, ch: float, vmax: float) -> tuple[str, str]:
    """The cells (``<rect class="cell">`` with a ``<title>``) and the hot outlines drawn on top of them."""
    hot = {(int(p[0]), int(p[1])) for p in hm.hot}
    cold = {(int(p[0]), int(p[1])) for p in hm.cold}
    cells, marks = [], []
    for layer, row in enumerate(hm.rate):
        for expert, raw in enumerate(row):
            rate = _finite(raw) or 0.0
            st = _cell_state(layer, expert, hot, cold)
            fill = "url(#hm-cold)" if st == "cold" else heat_color(rate / vmax if vmax > 0 else 0.0)
            x, y = x0 + expert * cw, y0 + layer * ch
            data_rate = "0" if raw is None else format(float(raw), ".6g")
            tip = f"layer {layer} expert {expert}: {rate:.1f} tok/s" + ("" if st == "normal" else f" ({st})")
            cells.append(f'<rect class="cell" x="{_num(x)}" y="{_num(y)}" width="{_num(cw)}" height="{_num(ch)}" '
                         f'fill="{fill}" data-layer="{layer}" '
                         f'data-expert="{expert}" data-rate="{data_rate}" data-state="{st}">'
                         f"<title>{escape(tip)}</title></rect>")
            if st == "hot":
                marks.append(f'<rect class="hot-mark" x="{_num(x + 1)}" y="{_num(y + 1)}" width="{_num(cw - 2)}" '
                             f'height="{_num(ch - 2)}" fill="none" stroke="#111111" stroke-width="2" '
                             f'pointer-events="none"/>')
    return "".join(cells), "".join(marks)


def _heat_labels(num_layers: int, num_experts: int, x0: float, y0: float, cw: float, ch: float) -> str:
    """Expert numbers above the grid, layer numbers left of it, and the two axis titles."""
    parts = [f'<text x="{_num(x0)}" y="11" font-size="11" fill="#333">expert →</text>',
             f'<text x="2" y="{_num(y0 - 4)}" font-size="11" fill="#333">layer ↓</text>']
    ex = _label_step(cw, 18)
    for e in range(0, num_experts, ex):
        parts.append(f'<text class="label-expert" x="{_num(x0 + (e + 0.5) * cw)}" y="{_num(y0 - 4)}" '
                     f'text-anchor="middle" font-size="9" fill="#555">{e}</text>')
    ly = _label_step(ch, 11)
    for layer in range(0, num_layers, ly):
        parts.append(f'<text class="label-layer" x="{_num(x0 - 4)}" y="{_num(y0 + (layer + 0.5) * ch)}" '
                     f'text-anchor="end" dominant-baseline="middle" font-size="9" fill="#555">{layer}</text>')
    return "".join(parts)


def _heat_legend(x0: float, y: float, vmax: float) -> str:
    """Gradient bar 0 .. max tok/s, and the hot / cold swatches."""
    return (f'<g class="legend"><rect x="{_num(x0)}" y="{_num(y)}" width="160" height="10" fill="url(#hm-scale)" '
            f'stroke="#999" stroke-width="0.5"/>'
            f'<text x="{_num(x0)}" y="{_num(y + 22)}" font-size="10" fill="#333">0</text>'
            f'<text class="legend-max" x="{_num(x0 + 160)}" y="{_num(y + 22)}" font-size="10" fill="#333" '
            f'text-anchor="end">max {vmax:.1f} tok/s</text>'
            f'<rect x="{_num(x0 + 180)}" y="{_num(y)}" width="12" height="10" fill="{heat_color(0.8)}" '
            f'stroke="#111" stroke-width="2"/>'
            f'<text x="{_num(x0 + 197)}" y="{_num(y + 9)}" font-size="10" fill="#333">hot</text>'
            f'<rect x="{_num(x0 + 230)}" y="{_num(y)}" width="12" height="10" fill="url(#hm-cold)"/>'
            f'<text x="{_num(x0 + 247)}" y="{_num(y + 9)}" font-size="10" fill="#333">cold</text></g>')


def render_heatmap(state: DashboardState) -> str:
    """``heatmap`` panel: ``<svg id="heatmap-svg">`` with one cell per ``[L][E]`` rate, axis labels, legend."""
    hm = state.heatmap
    if hm is None or not hm.rate or not any(hm.rate):
        return _empty(state, "No expert load yet.")
    num_layers, num_experts = len(hm.rate), max(len(r) for r in hm.rate)
    cw = max(3.0, min(40.0, 960.0 / num_experts))
    ch = max(5.0, min(26.0, 600.0 / num_layers))
    x0, y0 = 34.0, 30.0
    vmax = max((_finite(v) or 0.0 for row in hm.rate for v in row), default=0.0)
    cells, marks = _heat_cells(hm, x0, y0, cw, ch, vmax)
    grid_h = num_layers * ch
    width = max(x0 + num_experts * cw + 10, x0 + 300)
    height = y0 + grid_h + 40
    svg = (_svg_open(width, height, "heatmap", ' id="heatmap-svg"') + _heatmap_defs()
           + _heat_labels(num_layers, num_experts, x0, y0, cw, ch)
           + f'<g class="cells" stroke="#ffffff" stroke-width="0.5">{cells}</g><g class="hot-marks">{marks}</g>'
           + _heat_legend(x0, y0 + grid_h + 10, vmax) + "</svg>")
    caption = (f"Routed tokens/s per expert, averaged over the last {hm.span_s:g} s (windows of {hm.window_s:g} s); "
               f"hot = at least {hm.hot_factor:g}× its layer's mean, cold = no token in the newest window. "
               f"{len(hm.hot)} hot, {len(hm.cold)} cold.")
    return f'<p class="caption">{escape(caption)}</p><div class="svg-wrap">{svg}</div>'


# --------------------------------------------------------------------------- shards


def _shard_chart(ss: ShardSeries, layer: int, xdom: tuple[float, float], ymax: float,
                 yticks: list[float], now: float) -> str:
    """Small multi-line chart of ``ss.rate[layer]``: one polyline (run) per shard, ``None`` breaks it."""
    f = _Frame(340, 150, xdom, (0.0, ymax))
    parts = [_svg_open(f.width, f.height, "shard-chart", f' data-layer="{layer}"'),
             (f'<text x="{_num(f.left)}" y="13" font-size="11" font-weight="bold" fill="#222">'
              f"MoE layer {layer} · tokens/s per shard</text>"),
             f.axes(_time_ticks(*xdom, now, 4), [(v, f"{v:g}") for v in yticks])]
    num_shards = max((len(w) for w in ss.rate[layer]), default=0)
    for shard in range(num_shards):
        pts = [(t, _finite(w[shard]) if shard < len(w) else None) for t, w in zip(ss.times, ss.rate[layer])]
        color = PALETTE[shard % len(PALETTE)]
        attrs = f'class="shard-line" data-layer="{layer}" data-shard="{shard}"'
        lines = "".join(_polyline(f, run, attrs, color) for run in _segments(pts))
        parts.append(f'<g class="shard-series" data-layer="{layer}" data-shard="{shard}">'
                     f"<title>shard {shard}</title>{lines}</g>")
    parts.append("</svg>")
    return "".join(parts)


def _event_marks(frame: _Frame, events: Sequence[EventView]) -> str:
    """Vertical lines at rebalance / scale events that fall in the chart's time range."""
    parts = []
    for ev in events:
        base = ev.kind.removesuffix("_failed")
        if base not in MARKED_KINDS or not frame.contains_x(ev.time):
            continue
        failed = ev.kind.endswith("_failed")
        color = FAILED_COLOR if failed else KIND_COLORS.get(base, "#333")
        px = _num(frame.x(ev.time))
        dash = ' stroke-dasharray="3 3"' if failed else ""
        tip = f"{ev.kind} at {fmt_clock(ev.time)}: {ev.reason}"
        parts.append(f'<line class="event-mark" data-kind="{escape(ev.kind)}" x1="{px}" x2="{px}" '
                     f'y1="{_num(frame.top)}" y2="{_num(frame.bottom)}" stroke="{color}" stroke-width="2"{dash}>'
                     f"<title>{escape(tip)}</title></line>")
    return "".join(parts)


def _balancedness_chart(ss: ShardSeries, events: Sequence[EventView], xdom: tuple[float, float], now: float) -> str:
    """Balancedness (0..1) of every layer over time over a shaded min-over-layers band, 0.9 dashed, events marked."""
    f = _Frame(720, 220, xdom, (0.0, 1.0))
    ref = _num(f.y(BALANCED_REF))
    parts = [_svg_open(f.width, f.height, "balancedness-chart", ' id="balancedness-svg"'),
             (f'<text x="{_num(f.left)}" y="13" font-size="11" font-weight="bold" fill="#222">'
              "balancedness per layer (mean / max tokens per shard)</text>"),
             f.axes(_time_ticks(*xdom, now), [(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]),
             (f'<line class="bal-ref" x1="{_num(f.left)}" x2="{_num(f.right)}" y1="{ref}" y2="{ref}" '
              f'stroke="#2ca02c" stroke-dasharray="5 4" stroke-width="1"/>'),
             (f'<text x="{_num(f.right - 2)}" y="{_num(f.y(BALANCED_REF) - 3)}" text-anchor="end" font-size="9" '
              f'fill="#2ca02c">{BALANCED_REF:g}</text>')]
    runs = _segments([(t, _finite(b)) for t, b in zip(ss.times, ss.min_balancedness)])
    parts.append('<g class="bal-min-series" opacity="0.3"><title>minimum over layers</title>'
                 + "".join(_polyline(f, r, 'class="bal-min"', "#111111", 6) for r in runs) + "</g>")
    for layer, series in enumerate(ss.balancedness):
        color = PALETTE[layer % len(PALETTE)]
        attrs = f'class="bal-line" data-layer="{layer}"'
        runs = _segments([(t, _finite(b)) for t, b in zip(ss.times, series)])
        parts.append(f'<g class="bal-series" data-layer="{layer}"><title>layer {layer}</title>'
                     + "".join(_polyline(f, r, attrs, color, 1.5) for r in runs) + "</g>")
    parts.append(_event_marks(f, events))
    parts.append("</svg>")
    return "".join(parts)


def _swatches(items: Iterable[tuple[str, str]], cls: str) -> str:
    """An HTML legend: ``(colour, label)`` pairs (labels already escaped)."""
    spans = "".join(f'<span class="swatch"><i style="background:{c}"></i>{label}</span>' for c, label in items)
    return f'<div class="legend {cls}">{spans}</div>'


def render_shards(state: DashboardState) -> str:
    """``shards`` panel: per-layer tokens/s per shard charts, then the balancedness chart with events."""
    ss = state.shard_series
    if ss is None or not ss.times or not ss.rate:
        return _empty(state, "No load windows yet.")
    xdom = _time_domain(state, ss.times)
    now = max(state.time, ss.times[-1])
    ymax_raw = max((v for layer in ss.rate for w in layer for v in (_finite(x) for x in w) if v is not None),
                   default=0.0)
    ymax, yticks = _value_ticks(ymax_raw)
    num_shards = max(ss.num_shards, max((len(w) for layer in ss.rate for w in layer), default=0))
    charts = "".join(f'<div class="chart" data-layer="{layer}">{_shard_chart(ss, layer, xdom, ymax, yticks, now)}</div>'
                     for layer in range(len(ss.rate)))
    legend = _swatches(((PALETTE[i % len(PALETTE)], f"shard {i}") for i in range(num_shards)), "shard-legend")
    layers = [(PALETTE[i % len(PALETTE)], f"layer {i}") for i in range(len(ss.balancedness))]
    kinds = [(KIND_COLORS[k], f"{k} (vertical line)") for k in MARKED_KINDS]
    bal_legend = _swatches([*layers, ("#b0b0b0", "min over layers (shaded band)"), ("#2ca02c", f"{BALANCED_REF:g} reference"),
                            *kinds, (FAILED_COLOR, "failed action")], "balancedness-legend")
    return (f'<p class="caption">{len(ss.times)} load windows, {num_shards} shards; '
            f"time relative to {escape(fmt_clock(state.time))}.</p>"
            f'{legend}<div class="small-multiples">{charts}</div>'
            f'<div class="svg-wrap">{_balancedness_chart(ss, state.events, xdom, now)}</div>{bal_legend}')


# --------------------------------------------------------------------------- placement


def _slot_cell(layer: int, shard: int, slot: int, expert: int, copies: Sequence[int]) -> str:
    """One ``<td class="slot">`` box; replicated experts carry ``data-replicated="1"``."""
    n = copies[expert] if 0 <= expert < len(copies) else 1
    rep = ' data-replicated="1"' if n > 1 else ""
    tip = f' title="expert {expert}: {n} copies"' if n > 1 else ""
    return (f'<td class="slot" data-layer="{layer}" data-shard="{shard}" data-slot="{slot}" '
            f'data-expert="{expert}"{rep}{tip}>{expert}</td>')


def _placement_layer(pl: PlacementView, layer: int, unhealthy: set[int]) -> str:
    """Shard x slot table of one layer, plus the replicated / missing experts of that layer."""
    row = pl.phy2log[layer]
    copies = pl.copies[layer] if layer < len(pl.copies) else []
    sps = max(1, pl.slots_per_shard)
    num_shards = max(pl.num_shards, math.ceil(len(row) / sps))
    rows = []
    for shard in range(num_shards):
        slots = range(shard * sps, min(len(row), (shard + 1) * sps))
        cells = "".join(_slot_cell(layer, shard, p, int(row[p]), copies) for p in slots)
        down = shard in unhealthy
        rows.append(f'<tr class="placement-row" data-shard="{shard}" data-healthy="{0 if down else 1}">'
                    f'<th>shard {shard}{" ✗" if down else ""}</th>{cells}</tr>')
    replicated = [f"{e}×{n}" for e, n in enumerate(copies) if n > 1]
    missing = [str(e) for e, n in enumerate(copies) if n < 1]
    info = f"replicated: {', '.join(replicated) or 'none'}" + (f"; missing: {', '.join(missing)}" if missing else "")
    return (f'<div class="placement-layer" data-layer="{layer}"><h4>MoE layer {layer}</h4>'
            f'<table class="placement-grid"><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="small">{escape(info)}</p></div>')


def render_placement(state: DashboardState) -> str:
    """``placement`` panel: ``placement epoch N`` and one shard x slot grid per MoE layer."""
    pl = state.placement
    if pl is None or not pl.phy2log:
        return _empty(state, "No placement published yet.")
    unhealthy = {s.shard_id for s in state.serving.shards if not s.healthy}
    layers = "".join(_placement_layer(pl, layer, unhealthy) for layer in range(len(pl.phy2log)))
    return (f'<h3 class="placement-epoch" data-epoch="{pl.epoch}">placement epoch {pl.epoch}</h3>'
            f'<p class="caption">{pl.num_shards} shards × {pl.slots_per_shard} slots; '
            f'<span class="slot-key replicated">n</span> = expert with more than one copy.</p>'
            f'<div class="placement-layers">{layers}</div>')


# --------------------------------------------------------------------------- timeline


def _event_strip(state: DashboardState) -> str:
    """A compact time axis (lookback window) with one tick per event."""
    lo, hi = _time_domain(state, [])
    f = _Frame(720, 44, (lo, hi), (0.0, 1.0), margin=(4, 16, 18, 24))
    parts = [_svg_open(f.width, f.height, "event-strip", ' id="event-strip-svg"'),
             f.axes(_time_ticks(lo, hi, state.time), [])]
    for ev in state.events:
        if not f.contains_x(ev.time):
            continue
        color = FAILED_COLOR if ev.kind.endswith("_failed") else KIND_COLORS.get(ev.kind, "#333")
        px = _num(f.x(ev.time))
        tip = f"{fmt_clock(ev.time)} {ev.kind}: {ev.reason}"
        parts.append(f'<line class="event-tick" data-kind="{escape(ev.kind)}" x1="{px}" x2="{px}" '
                     f'y1="{_num(f.top)}" y2="{_num(f.bottom)}" stroke="{color}" stroke-width="3">'
                     f"<title>{escape(tip)}</title></line>")
    parts.append("</svg>")
    return "".join(parts)


def _event_row(ev: EventView) -> str:
    """``<tr class="event" data-kind>`` with every figure of one event."""
    cells = [
        _td(escape(fmt_clock(ev.time))),
        _td(escape(ev.kind), "kind"),
        _td(escape(ev.reason), "reason"),
        _td(escape(_arrow(ev.epoch_before, ev.epoch_after))),
        _td(escape(fmt_seconds(ev.duration_s))),
        _td(DASH if ev.slots_moved is None else str(int(ev.slots_moved))),
        _td(escape(fmt_bytes(ev.bytes_loaded))),
        _td(escape(_arrow(ev.balancedness_before, ev.balancedness_after, fmt_frac))),
        _td(escape(_arrow(ev.measured_before, ev.measured_after, fmt_frac))),
    ]
    return f'<tr class="event" data-kind="{escape(ev.kind)}" data-time="{ev.time!r}">{"".join(cells)}</tr>'


def render_timeline(state: DashboardState) -> str:
    """``timeline`` panel: an event strip and the table of events, newest first."""
    events = sorted(state.events, key=lambda e: -e.time)
    if not events:
        return _event_strip(state) + _empty(state, f"No autoscaler events in the last {state.lookback_s:g} s.")
    headers = ["time", "kind", "reason", "epoch", "duration", "slots moved", "bytes loaded",
               "predicted bal.", "measured bal."]
    return _event_strip(state) + _table(headers, (_event_row(e) for e in events), "events")


# --------------------------------------------------------------------------- serving


def _meta(state: DashboardState) -> str:
    """Hidden element the page reads for its header: model, Redis status, state time."""
    err = escape(state.redis_error or "")
    return (f'<div class="panel-meta" hidden data-model="{escape(state.model)}" '
            f'data-redis="{"ok" if state.redis_ok else "error"}" data-redis-error="{err}" '
            f'data-time="{state.time!r}"></div>')


def _stat(name: str, label: str, value: str) -> str:
    """One total: label above a big value (``value`` already escaped)."""
    return (f'<div class="stat"><span class="stat-label">{label}</span>'
            f'<span class="stat-value" data-stat="{name}">{value}</span></div>')


def _totals(sv: ServingView) -> str:
    """Running / waiting / tokens/s / TTFT / ITL totals."""
    return ('<div class="totals">' + _stat("running", "running", str(sv.running))
            + _stat("waiting", "waiting", str(sv.waiting))
            + _stat("tokens_per_s", "tokens/s", fmt_rate(sv.tokens_per_s))
            + _stat("ttft", "TTFT p50 / p99", f"{fmt_seconds(sv.ttft_p50_s)} / {fmt_seconds(sv.ttft_p99_s)}")
            + _stat("itl", "ITL p50 / p99", f"{fmt_seconds(sv.itl_p50_s)} / {fmt_seconds(sv.itl_p99_s)}")
            + "</div>")


def _kv_bar(frac: float) -> str:
    """KV cache use as a small bar and a percentage."""
    pct = 100.0 * min(1.0, max(0.0, _finite(frac) or 0.0))
    level = "high" if pct >= 90 else ("mid" if pct >= 70 else "low")
    return (f'<span class="bar" data-level="{level}"><span class="bar-fill" style="width:{pct:.0f}%"></span></span> '
            f'<span class="pct">{pct:.0f}%</span>')


def _replica_row(r: ReplicaHealth) -> str:
    """``<tr class="replica" data-replica>`` of one replica's health."""
    cells = [
        _td(escape(r.replica), "id"), _td(str(r.running)), _td(str(r.waiting)),
        _td(_kv_bar(r.kv_cache_usage) + f' <span class="small">of {r.num_blocks} blocks</span>'),
        _td(DASH if r.placement_epoch is None else str(r.placement_epoch)),
        _td(fmt_rate(r.tokens_per_s)),
        _td(escape(f"{fmt_seconds(r.ttft_p50_s)} / {fmt_seconds(r.ttft_p99_s)}")),
        _td(escape(f"{fmt_seconds(r.itl_p50_s)} / {fmt_seconds(r.itl_p99_s)}")),
        _td(f"{r.requests_finished} / {r.requests_failed}"),
        _td(escape(fmt_seconds(r.age_s))),
    ]
    return f'<tr class="replica" data-replica="{escape(r.replica)}">{"".join(cells)}</tr>'


def _shard_row(s: ShardHealth) -> str:
    """``<tr class="shard" data-shard data-healthy>`` of one shard's health."""
    cells = [
        _td(str(s.shard_id), "id"),
        _td("✓ healthy" if s.healthy else "✗ down", "ok" if s.healthy else "bad"),
        _td(escape(s.address or DASH)), _td(str(s.slots)),
        _td(escape(fmt_bytes(s.weight_bytes))), _td(escape(fmt_bytes(s.rss_bytes))),
        _td(f"{s.tokens:,}"), _td(escape(s.error or ""), "error"),
    ]
    return (f'<tr class="shard" data-shard="{s.shard_id}" data-healthy="{1 if s.healthy else 0}">'
            f'{"".join(cells)}</tr>')


def render_serving(state: DashboardState) -> str:
    """``serving`` panel: Redis status, totals, a table per replica and a table per shard."""
    sv = state.serving
    redis = ("Redis: ok" if state.redis_ok
             else f"Redis: unavailable{': ' + state.redis_error if state.redis_error else ''}")
    parts = [_meta(state),
             f'<p class="redis" data-redis="{"ok" if state.redis_ok else "error"}">{escape(redis)}</p>',
             _totals(sv), "<h4>replicas</h4>"]
    if sv.replicas:
        headers = ["replica", "running", "waiting", "KV cache", "epoch", "tok/s", "TTFT p50 / p99",
                   "ITL p50 / p99", "finished / failed", "age"]
        parts.append(_table(headers, (_replica_row(r) for r in sv.replicas), "replicas"))
    else:
        parts.append(_empty(state, "No replica has published telemetry."))
    parts.append("<h4>shards</h4>")
    if sv.shards:
        headers = ["shard", "health", "address", "slots", "weights", "RSS", "tokens", "error"]
        parts.append(_table(headers, (_shard_row(s) for s in sv.shards), "shards"))
    else:
        parts.append('<p class="empty">No shard status.</p>')
    return "".join(parts)


# --------------------------------------------------------------------------- economics


def _dense_divisor(ec: Economics) -> float | None:
    """``E ** 0.44 / A ** 0.63`` (``None`` when E or A is not positive)."""
    if ec.num_experts <= 0 or ec.top_k <= 0:
        return None
    return ec.num_experts ** 0.44 / ec.top_k ** 0.63


def _active_bar(ec: Economics) -> str:
    """Two-segment bar: active parameters per token vs the rest of the total."""
    frac = ec.active_params / ec.total_params if ec.total_params > 0 else 0.0
    frac = min(1.0, max(0.0, frac))
    w = 480.0
    aw = w * frac
    return (_svg_open(w, 22, "econ-bar", ' id="economics-bar-svg"')
            + f'<rect class="econ-active" x="0" y="2" width="{_num(aw)}" height="18" fill="#e6550d">'
            f"<title>active {escape(fmt_params(ec.active_params))}</title></rect>"
            f'<rect class="econ-inactive" x="{_num(aw)}" y="2" width="{_num(w - aw)}" height="18" fill="#d9d9d9">'
            f"<title>inactive {escape(fmt_params(ec.total_params - ec.active_params))}</title></rect></svg>")


def _pct(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``: ``"16%"`` (one decimal under 10%)."""
    if whole <= 0:
        return DASH
    p = 100.0 * part / whole
    return f"{p:.1f}%" if p < 10 else f"{p:.0f}%"


def _econ_rows(ec: Economics) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the economics table (values not yet escaped)."""
    div = _dense_divisor(ec)
    formula = (f"total ÷ (E^0.44 / A^0.63) = {fmt_params(ec.total_params)} ÷ "
               f"({ec.num_experts}^0.44 / {ec.top_k}^0.63)" + (f" = {fmt_params(ec.total_params)} ÷ {div:.3f}"
                                                               if div else ""))
    per_copy = (ec.routed_expert_params / (ec.num_experts * ec.num_moe_layers)
                if ec.num_experts > 0 and ec.num_moe_layers > 0 else None)
    bpp = ec.bytes_per_param
    return [
        ("family", ec.family),
        ("layers", f"{ec.num_layers} ({ec.num_moe_layers} MoE)"),
        ("routed experts per MoE layer (E)", str(ec.num_experts)),
        ("experts per token (A, top-k)", str(ec.top_k)),
        ("total parameters", fmt_params(ec.total_params)),
        ("active parameters per token", f"{fmt_params(ec.active_params)} ({_pct(ec.active_params, ec.total_params)})"),
        ("routed-expert parameters", (f"{fmt_params(ec.routed_expert_params)} "
                                      f"({_pct(ec.routed_expert_params, ec.total_params)} of total)")),
        ("other parameters (attention, embeddings, dense / shared MLP)",
         fmt_params(ec.total_params - ec.routed_expert_params)),
        ("one expert (one layer)", DASH if per_copy is None
         else f"{fmt_params(per_copy)} = {fmt_bytes(per_copy * bpp)}"),
        ("dense-equivalent estimate", fmt_params(ec.dense_equivalent_params)),
        ("formula (Epoch AI heuristic)", formula),
        ("bytes / param", str(bpp)),
        ("weights in total", fmt_bytes(ec.total_params * bpp)),
    ]


def _shard_memory(shards: Sequence[ShardHealth]) -> str:
    """Memory per shard: weights held and RSS."""
    if not shards:
        return '<p class="small">No shard status: memory per shard unknown.</p>'
    rows = (f'<tr class="shard-memory" data-shard="{s.shard_id}">{_td(str(s.shard_id))}{_td(str(s.slots))}'
            f"{_td(escape(fmt_bytes(s.weight_bytes)))}{_td(escape(fmt_bytes(s.rss_bytes)))}</tr>" for s in shards)
    return _table(["shard", "slots", "weights", "RSS"], rows, "shard-memory")


def render_economics(state: DashboardState) -> str:
    """``economics`` panel: active vs total params (text and bar), the parameter table, memory per shard."""
    ec = state.economics
    if ec is None:
        return _empty(state, "No checkpoint parameter counts.") + "<h4>memory per shard</h4>" + _shard_memory(
            state.serving.shards)
    headline = (f"active {fmt_params(ec.active_params)} of {fmt_params(ec.total_params)} per token "
                f"({_pct(ec.active_params, ec.total_params)})")
    rows = (f"<tr><th>{escape(k)}</th>{_td(escape(v))}</tr>" for k, v in _econ_rows(ec))
    return (f'<p class="headline" data-active="{ec.active_params}" data-total="{ec.total_params}">'
            f"{escape(headline)}</p>"
            f'<div class="svg-wrap">{_active_bar(ec)}</div>'
            f'<table class="economics"><tbody>{"".join(rows)}</tbody></table>'
            "<h4>memory per shard</h4>" + _shard_memory(state.serving.shards))


# --------------------------------------------------------------------------- all panels


PANELS: dict[str, Callable[[DashboardState], str]] = {
    "heatmap": render_heatmap,
    "shards": render_shards,
    "placement": render_placement,
    "timeline": render_timeline,
    "serving": render_serving,
    "economics": render_economics,
}
"""Panel name -> renderer; the page has one ``<section id="panel-NAME">`` per name."""


def render_panels(state: DashboardState) -> dict[str, str]:
    """Every panel of ``state`` as ``{name: HTML fragment}`` (keys and order of :data:`PANELS`).

    A panel whose renderer fails (malformed state) shows the error instead of taking
    the other panels down with it.
    """
    out = {}
    for name, fn in PANELS.items():
        try:
            out[name] = fn(state)
        except Exception as e:  # noqa: BLE001 - one bad view must not blank the whole page
            out[name] = f'<p class="panel-error">could not render {name}: {escape(type(e).__name__)}: {escape(str(e))}</p>'
    return out
