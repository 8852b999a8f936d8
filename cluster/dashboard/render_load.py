"""The load panels of the dashboard: the expert heatmap and the per-shard / balancedness charts.

* ``heatmap``: routed tokens/s per (MoE layer x logical expert), one
  ``<rect class="cell">`` each, coloured by rate relative to the hottest cell;
  hot cells outlined, cold cells hatched, collapsed cells dotted and dead ones crossed (starved over
  ``collapse_windows`` windows, not just quiet in the newest one);
* ``shards``: per MoE layer, tokens/s per shard over the load windows, and the
  balancedness of every layer over time with the autoscaler's actions marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from moeyard.cluster.dashboard.fmt import finite, fmt_clock
from moeyard.cluster.dashboard.fragments import empty, swatches, time_domain
from moeyard.cluster.dashboard.state import DashboardState, EventView, HeatmapView, ShardSeries
from moeyard.cluster.dashboard.svg import (
    FAILED_COLOR,
    HEAT_STOPS,
    KIND_COLORS,
    PALETTE,
    Frame,
    heat_color,
    label_step,
    num,
    polyline,
    segments,
    svg_open,
    time_ticks,
    value_ticks,
)

__all__ = ["BALANCED_REF", "MARKED_KINDS", "render_heatmap", "render_shards"]

BALANCED_REF = 0.9
"""Reference line on the balancedness chart (the autoscaler's default threshold)."""
MARKED_KINDS = ("rebalance", "scale_up", "scale_down")
"""Event kinds drawn as vertical lines on the balancedness chart (``*_failed`` too, dashed)."""


# --------------------------------------------------------------------------- heatmap


def _heatmap_defs() -> str:
    """The hatch pattern of cold cells and the legend's gradient."""
    stops = "".join(f'<stop offset="{f:g}" stop-color="{heat_color(f)}"/>' for f, _ in HEAT_STOPS)
    return ('<defs><pattern id="hm-cold" width="5" height="5" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><rect width="5" height="5" fill="#d4d4d4"/>'
            '<line x1="0" y1="0" x2="0" y2="5" stroke="#7a7a7a" stroke-width="2"/></pattern>'
            '<pattern id="hm-collapsed" width="6" height="6" patternUnits="userSpaceOnUse">'
            '<rect width="6" height="6" fill="#fde0dd"/><circle cx="3" cy="3" r="1.4" fill="#ae017e"/></pattern>'
            '<pattern id="hm-dead" width="6" height="6" patternUnits="userSpaceOnUse">'
            '<rect width="6" height="6" fill="#3f3f3f"/><path d="M0 0L6 6M6 0L0 6" stroke="#d7301f" '
            'stroke-width="1"/></pattern>'
            f'<linearGradient id="hm-scale" x1="0" x2="1" y1="0" y2="0">{stops}</linearGradient></defs>')


_STATE_FILLS = {"dead": "url(#hm-dead)", "collapsed": "url(#hm-collapsed)", "cold": "url(#hm-cold)"}


def _cell_state(layer: int, expert: int, hot: set[tuple[int, int]], cold: set[tuple[int, int]],
                collapsed: set[tuple[int, int]] = frozenset(), dead: set[tuple[int, int]] = frozenset()) -> str:
    """``"dead"``, ``"collapsed"`` (starved over many windows), ``"cold"`` (no tokens in the newest one),
    ``"hot"`` or ``"normal"``, in that order of precedence."""
    key = (layer, expert)
    for name, cells in (("dead", dead), ("collapsed", collapsed), ("cold", cold), ("hot", hot)):
        if key in cells:
            return name
    return "normal"


def _heat_cells(hm: HeatmapView, x0: float, y0: float, cw: float, ch: float, vmax: float) -> tuple[str, str]:
    """The cells (``<rect class="cell">`` with a ``<title>``) and the hot outlines drawn on top of them."""
    hot = {(int(p[0]), int(p[1])) for p in hm.hot}
    cold = {(int(p[0]), int(p[1])) for p in hm.cold}
    collapsed = {(int(p[0]), int(p[1])) for p in hm.collapsed}
    dead = {(int(p[0]), int(p[1])) for p in hm.dead}
    cells, marks = [], []
    for layer, row in enumerate(hm.rate):
        for expert, raw in enumerate(row):
            rate = finite(raw) or 0.0
            st = _cell_state(layer, expert, hot, cold, collapsed, dead)
            fill = _STATE_FILLS.get(st) or heat_color(rate / vmax if vmax > 0 else 0.0)
            x, y = x0 + expert * cw, y0 + layer * ch
            data_rate = "0" if raw is None else format(float(raw), ".6g")
            tip = f"layer {layer} expert {expert}: {rate:.1f} tok/s" + ("" if st == "normal" else f" ({st})")
            cells.append(f'<rect class="cell" x="{num(x)}" y="{num(y)}" width="{num(cw)}" height="{num(ch)}" '
                         f'fill="{fill}" data-layer="{layer}" '
                         f'data-expert="{expert}" data-rate="{data_rate}" data-state="{st}">'
                         f"<title>{escape(tip)}</title></rect>")
            if st == "hot":
                marks.append(f'<rect class="hot-mark" x="{num(x + 1)}" y="{num(y + 1)}" width="{num(cw - 2)}" '
                             f'height="{num(ch - 2)}" fill="none" stroke="#111111" stroke-width="2" '
                             f'pointer-events="none"/>')
    return "".join(cells), "".join(marks)


def _heat_labels(num_layers: int, num_experts: int, x0: float, y0: float, cw: float, ch: float) -> str:
    """Expert numbers above the grid, layer numbers left of it, and the two axis titles."""
    parts = [f'<text x="{num(x0)}" y="11" font-size="11" fill="#333">expert →</text>',
             f'<text x="2" y="{num(y0 - 4)}" font-size="11" fill="#333">layer ↓</text>']
    ex = label_step(cw, 18)
    for e in range(0, num_experts, ex):
        parts.append(f'<text class="label-expert" x="{num(x0 + (e + 0.5) * cw)}" y="{num(y0 - 4)}" '
                     f'text-anchor="middle" font-size="9" fill="#555">{e}</text>')
    ly = label_step(ch, 11)
    for layer in range(0, num_layers, ly):
        parts.append(f'<text class="label-layer" x="{num(x0 - 4)}" y="{num(y0 + (layer + 0.5) * ch)}" '
                     f'text-anchor="end" dominant-baseline="middle" font-size="9" fill="#555">{layer}</text>')
    return "".join(parts)


def _heat_legend(x0: float, y: float, vmax: float) -> str:
    """Gradient bar 0 .. max tok/s, and the hot / cold swatches."""
    return (f'<g class="legend"><rect x="{num(x0)}" y="{num(y)}" width="160" height="10" fill="url(#hm-scale)" '
            f'stroke="#999" stroke-width="0.5"/>'
            f'<text x="{num(x0)}" y="{num(y + 22)}" font-size="10" fill="#333">0</text>'
            f'<text class="legend-max" x="{num(x0 + 160)}" y="{num(y + 22)}" font-size="10" fill="#333" '
            f'text-anchor="end">max {vmax:.1f} tok/s</text>'
            f'<rect x="{num(x0 + 180)}" y="{num(y)}" width="12" height="10" fill="{heat_color(0.8)}" '
            f'stroke="#111" stroke-width="2"/>'
            f'<text x="{num(x0 + 197)}" y="{num(y + 9)}" font-size="10" fill="#333">hot</text>'
            f'<rect x="{num(x0 + 230)}" y="{num(y)}" width="12" height="10" fill="url(#hm-cold)"/>'
            f'<text x="{num(x0 + 247)}" y="{num(y + 9)}" font-size="10" fill="#333">cold</text>'
            f'<rect x="{num(x0 + 280)}" y="{num(y)}" width="12" height="10" fill="url(#hm-collapsed)"/>'
            f'<text x="{num(x0 + 297)}" y="{num(y + 9)}" font-size="10" fill="#333">collapsed</text>'
            f'<rect x="{num(x0 + 355)}" y="{num(y)}" width="12" height="10" fill="url(#hm-dead)"/>'
            f'<text x="{num(x0 + 372)}" y="{num(y + 9)}" font-size="10" fill="#333">dead</text></g>')


def render_heatmap(state: DashboardState) -> str:
    """``heatmap`` panel: ``<svg id="heatmap-svg">`` with one cell per ``[L][E]`` rate, axis labels, legend."""
    hm = state.heatmap
    if hm is None or not hm.rate or not any(hm.rate):
        return empty(state, "No expert load yet.")
    num_layers, num_experts = len(hm.rate), max(len(r) for r in hm.rate)
    cw = max(3.0, min(40.0, 960.0 / num_experts))
    ch = max(5.0, min(26.0, 600.0 / num_layers))
    x0, y0 = 34.0, 30.0
    vmax = max((finite(v) or 0.0 for row in hm.rate for v in row), default=0.0)
    cells, marks = _heat_cells(hm, x0, y0, cw, ch, vmax)
    grid_h = num_layers * ch
    width = max(x0 + num_experts * cw + 10, x0 + 410)
    height = y0 + grid_h + 40
    svg = (svg_open(width, height, "heatmap", ' id="heatmap-svg"') + _heatmap_defs()
           + _heat_labels(num_layers, num_experts, x0, y0, cw, ch)
           + f'<g class="cells" stroke="#ffffff" stroke-width="0.5">{cells}</g><g class="hot-marks">{marks}</g>'
           + _heat_legend(x0, y0 + grid_h + 10, vmax) + "</svg>")
    caption = (f"Routed tokens/s per expert, averaged over the last {hm.span_s:g} s (windows of {hm.window_s:g} s); "
               f"hot = at least {hm.hot_factor:g}× its layer's mean, cold = no token in the newest window, "
               f"collapsed = below {hm.collapse_fraction:g}× its layer's mean in each of the layer's last "
               f"{hm.collapse_windows} windows with traffic, dead = no token in any of them. "
               f"{len(hm.hot)} hot, {len(hm.cold)} cold, {len(hm.collapsed)} collapsed, {len(hm.dead)} dead.")
    return f'<p class="caption">{escape(caption)}</p><div class="svg-wrap">{svg}</div>'


# --------------------------------------------------------------------------- shards


def _shard_chart(ss: ShardSeries, layer: int, xdom: tuple[float, float], ymax: float,
                 yticks: list[float], now: float) -> str:
    """Small multi-line chart of ``ss.rate[layer]``: one polyline (run) per shard, ``None`` breaks it."""
    f = Frame(340, 150, xdom, (0.0, ymax))
    parts = [svg_open(f.width, f.height, "shard-chart", f' data-layer="{layer}"'),
             (f'<text x="{num(f.left)}" y="13" font-size="11" font-weight="bold" fill="#222">'
              f"MoE layer {layer} · tokens/s per shard</text>"),
             f.axes(time_ticks(*xdom, now, 4), [(v, f"{v:g}") for v in yticks])]
    num_shards = max((len(w) for w in ss.rate[layer]), default=0)
    for shard in range(num_shards):
        pts = [(t, finite(w[shard]) if shard < len(w) else None) for t, w in zip(ss.times, ss.rate[layer])]
        color = PALETTE[shard % len(PALETTE)]
        attrs = f'class="shard-line" data-layer="{layer}" data-shard="{shard}"'
        lines = "".join(polyline(f, run, attrs, color) for run in segments(pts))
        parts.append(f'<g class="shard-series" data-layer="{layer}" data-shard="{shard}">'
                     f"<title>shard {shard}</title>{lines}</g>")
    parts.append("</svg>")
    return "".join(parts)


def _event_marks(frame: Frame, events: Sequence[EventView]) -> str:
    """Vertical lines at rebalance / scale events that fall in the chart's time range."""
    parts = []
    for ev in events:
        base = ev.kind.removesuffix("_failed")
        if base not in MARKED_KINDS or not frame.contains_x(ev.time):
            continue
        failed = ev.kind.endswith("_failed")
        color = FAILED_COLOR if failed else KIND_COLORS.get(base, "#333")
        px = num(frame.x(ev.time))
        dash = ' stroke-dasharray="3 3"' if failed else ""
        tip = f"{ev.kind} at {fmt_clock(ev.time)}: {ev.reason}"
        parts.append(f'<line class="event-mark" data-kind="{escape(ev.kind)}" x1="{px}" x2="{px}" '
                     f'y1="{num(frame.top)}" y2="{num(frame.bottom)}" stroke="{color}" stroke-width="2"{dash}>'
                     f"<title>{escape(tip)}</title></line>")
    return "".join(parts)


def _balancedness_chart(ss: ShardSeries, events: Sequence[EventView], xdom: tuple[float, float], now: float) -> str:
    """Balancedness (0..1) of every layer over time over a shaded min-over-layers band, 0.9 dashed, events marked."""
    f = Frame(720, 220, xdom, (0.0, 1.0))
    ref = num(f.y(BALANCED_REF))
    parts = [svg_open(f.width, f.height, "balancedness-chart", ' id="balancedness-svg"'),
             (f'<text x="{num(f.left)}" y="13" font-size="11" font-weight="bold" fill="#222">'
              "balancedness per layer (mean / max tokens per shard)</text>"),
             f.axes(time_ticks(*xdom, now), [(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]),
             (f'<line class="bal-ref" x1="{num(f.left)}" x2="{num(f.right)}" y1="{ref}" y2="{ref}" '
              f'stroke="#2ca02c" stroke-dasharray="5 4" stroke-width="1"/>'),
             (f'<text x="{num(f.right - 2)}" y="{num(f.y(BALANCED_REF) - 3)}" text-anchor="end" font-size="9" '
              f'fill="#2ca02c">{BALANCED_REF:g}</text>')]
    runs = segments([(t, finite(b)) for t, b in zip(ss.times, ss.min_balancedness)])
    parts.append('<g class="bal-min-series" opacity="0.3"><title>minimum over layers</title>'
                 + "".join(polyline(f, r, 'class="bal-min"', "#111111", 6) for r in runs) + "</g>")
    for layer, series in enumerate(ss.balancedness):
        color = PALETTE[layer % len(PALETTE)]
        attrs = f'class="bal-line" data-layer="{layer}"'
        runs = segments([(t, finite(b)) for t, b in zip(ss.times, series)])
        parts.append(f'<g class="bal-series" data-layer="{layer}"><title>layer {layer}</title>'
                     + "".join(polyline(f, r, attrs, color, 1.5) for r in runs) + "</g>")
    parts.append(_event_marks(f, events))
    parts.append("</svg>")
    return "".join(parts)


def render_shards(state: DashboardState) -> str:
    """``shards`` panel: per-layer tokens/s per shard charts, then the balancedness chart with events."""
    ss = state.shard_series
    if ss is None or not ss.times or not ss.rate:
        return empty(state, "No load windows yet.")
    xdom = time_domain(state, ss.times)
    now = max(state.time, ss.times[-1])
    ymax_raw = max((v for layer in ss.rate for w in layer for v in (finite(x) for x in w) if v is not None),
                   default=0.0)
    ymax, yticks = value_ticks(ymax_raw)
    num_shards = max(ss.num_shards, max((len(w) for layer in ss.rate for w in layer), default=0))
    charts = "".join(f'<div class="chart" data-layer="{layer}">{_shard_chart(ss, layer, xdom, ymax, yticks, now)}</div>'
                     for layer in range(len(ss.rate)))
    legend = swatches(((PALETTE[i % len(PALETTE)], f"shard {i}") for i in range(num_shards)), "shard-legend")
    layers = [(PALETTE[i % len(PALETTE)], f"layer {i}") for i in range(len(ss.balancedness))]
    kinds = [(KIND_COLORS[k], f"{k} (vertical line)") for k in MARKED_KINDS]
    bal_legend = swatches([*layers, ("#b0b0b0", "min over layers (shaded band)"),
                           ("#2ca02c", f"{BALANCED_REF:g} reference"),
                            *kinds, (FAILED_COLOR, "failed action")], "balancedness-legend")
    return (f'<p class="caption">{len(ss.times)} load windows, {num_shards} shards; '
            f"time relative to {escape(fmt_clock(state.time))}.</p>"
            f'{legend}<div class="small-multiples">{charts}</div>'
            f'<div class="svg-wrap">{_balancedness_chart(ss, state.events, xdom, now)}</div>{bal_legend}')
