"""The operations panels of the dashboard: the current placement and the autoscaler's timeline.

* ``placement``: per MoE layer, shard x slot grid of the logical expert in each slot;
* ``timeline``: the autoscaler's events, newest first, over a strip of the lookback window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from moeyard.cluster.dashboard.fmt import (
    DASH,
    arrow,
    fmt_bytes,
    fmt_clock,
    fmt_frac,
    fmt_seconds,
)
from moeyard.cluster.dashboard.fragments import empty, table, td, time_domain
from moeyard.cluster.dashboard.state import DashboardState, EventView, PlacementView
from moeyard.cluster.dashboard.svg import (
    FAILED_COLOR,
    KIND_COLORS,
    Frame,
    num,
    svg_open,
    time_ticks,
)

__all__ = ["render_placement", "render_timeline"]


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
        return empty(state, "No placement published yet.")
    unhealthy = {s.shard_id for s in state.serving.shards if not s.healthy}
    layers = "".join(_placement_layer(pl, layer, unhealthy) for layer in range(len(pl.phy2log)))
    return (f'<h3 class="placement-epoch" data-epoch="{pl.epoch}">placement epoch {pl.epoch}</h3>'
            f'<p class="caption">{pl.num_shards} shards × {pl.slots_per_shard} slots; '
            f'<span class="slot-key replicated">n</span> = expert with more than one copy.</p>'
            f'<div class="placement-layers">{layers}</div>')


# --------------------------------------------------------------------------- timeline


def _event_strip(state: DashboardState) -> str:
    """A compact time axis (lookback window) with one tick per event."""
    lo, hi = time_domain(state, [])
    f = Frame(720, 44, (lo, hi), (0.0, 1.0), margin=(4, 16, 18, 24))
    parts = [svg_open(f.width, f.height, "event-strip", ' id="event-strip-svg"'),
             f.axes(time_ticks(lo, hi, state.time), [])]
    for ev in state.events:
        if not f.contains_x(ev.time):
            continue
        color = FAILED_COLOR if ev.kind.endswith("_failed") else KIND_COLORS.get(ev.kind, "#333")
        px = num(f.x(ev.time))
        tip = f"{fmt_clock(ev.time)} {ev.kind}: {ev.reason}"
        parts.append(f'<line class="event-tick" data-kind="{escape(ev.kind)}" x1="{px}" x2="{px}" '
                     f'y1="{num(f.top)}" y2="{num(f.bottom)}" stroke="{color}" stroke-width="3">'
                     f"<title>{escape(tip)}</title></line>")
    parts.append("</svg>")
    return "".join(parts)


def _event_row(ev: EventView) -> str:
    """``<tr class="event" data-kind>`` with every figure of one event."""
    cells = [
        td(escape(fmt_clock(ev.time))),
        td(escape(ev.kind), "kind"),
        td(escape(ev.reason), "reason"),
        td(escape(arrow(ev.epoch_before, ev.epoch_after))),
        td(escape(fmt_seconds(ev.duration_s))),
        td(DASH if ev.slots_moved is None else str(int(ev.slots_moved))),
        td(escape(fmt_bytes(ev.bytes_loaded))),
        td(escape(arrow(ev.balancedness_before, ev.balancedness_after, fmt_frac))),
        td(escape(arrow(ev.measured_before, ev.measured_after, fmt_frac))),
    ]
    return f'<tr class="event" data-kind="{escape(ev.kind)}" data-time="{ev.time!r}">{"".join(cells)}</tr>'


def render_timeline(state: DashboardState) -> str:
    """``timeline`` panel: an event strip and the table of events, newest first."""
    events = sorted(state.events, key=lambda e: -e.time)
    if not events:
        return _event_strip(state) + empty(state, f"No autoscaler events in the last {state.lookback_s:g} s.")
    headers = ["time", "kind", "reason", "epoch", "duration", "slots moved", "bytes loaded",
               "predicted bal.", "measured bal."]
    return _event_strip(state) + table(headers, (_event_row(e) for e in events), "events")
