"""``moeyard top``: the dashboard's expert-load view in the terminal.

Fetches :class:`~moeyard.cluster.dashboard.state.DashboardState` from the dashboard's
``GET /api/state?lookback=SECONDS`` (bearer token) and draws it with ``rich``:

* a header (model, time, placement epoch, Redis, min balancedness now);
* a heatmap of routed tokens/s per (MoE layer x expert), each cell coloured by its
  rate relative to the hottest cell, hot experts ``▲`` and bold, cold ones ``·``;
* per layer: tokens/s per shard in the newest load window, balancedness now and a
  sparkline of it over the windows;
* the placement (shard -> experts in its slots, ``*`` = replicated);
* serving (requests, tokens/s, TTFT / ITL, KV cache per replica) and shards;
* the last autoscaler events.

:func:`render` is pure; :mod:`moeyard.cluster.cli.dashboard_client` fetches the state;
:func:`run_top` is the command (one frame with ``once``, else a live loop).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from moeyard.cluster.cli.dashboard_client import DashboardError, fetch_state
from moeyard.cluster.dashboard.state import (
    DashboardState,
    ShardSeries,
)

__all__ = ["render", "run_top", "sparkline"]

HOT_MARK = "▲"
COLD_MARK = "·"
COLLAPSED_MARK = "▽"
DEAD_MARK = "✕"
REPLICA_MARK = "*"
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
MAX_EVENTS = 8
BALANCED_OK = 0.9
"""Balancedness at or above this is drawn green (the autoscaler's default threshold)."""
BALANCED_WARN = 0.75
RAMP = ["#1b2a4a", "#1f4f82", "#1f78b4", "#2a9d8f", "#57b65f", "#b5c933", "#f2c12e", "#f28c28", "#e63b2e"]
"""Heatmap cell backgrounds, coolest (0) to hottest (the maximum rate)."""
_DARK_RAMP = 5
"""Ramp entries below this index get white text, the rest black."""
_HEAT_CELL = 7
"""Characters one heatmap cell needs ("999.9k▲") without padding."""


# --------------------------------------------------------------------------- formatting


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if x < 10:
        return f"{x:.1f}"
    if x < 1e3:
        return f"{x:.0f}"
    if x < 1e5:
        return f"{x / 1e3:.1f}k"
    if x < 1e6:
        return f"{x / 1e3:.0f}k"
    return f"{x / 1e6:.1f}M"


def _fmt_ms(s: float | None) -> str:
    if s is None:
        return "–"
    ms = s * 1e3
    return f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"


def _fmt_bal(b: float | None) -> str:
    return "–" if b is None else f"{b:.2f}"


def _fmt_mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _fmt_time(t: float, date: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.localtime(t))


def _bal_style(b: float | None) -> str:
    if b is None:
        return "dim"
    return "green" if b >= BALANCED_OK else "yellow" if b >= BALANCED_WARN else "bold red"


def _bal_text(b: float | None) -> Text:
    return Text(_fmt_bal(b), style=_bal_style(b))


def _ramp_style(frac: float) -> Style:
    i = min(len(RAMP) - 1, max(0, round(frac * (len(RAMP) - 1))))
    return Style(color="white" if i < _DARK_RAMP else "black", bgcolor=RAMP[i])


def sparkline(values: list[float | None], lo: float = 0.0, hi: float = 1.0) -> str:
    """One block character per value on the fixed scale ``lo..hi``; a space for ``None``."""
    out = []
    for v in values:
        if v is None:
            out.append(" ")
            continue
        frac = 0.0 if hi <= lo else (min(hi, max(lo, v)) - lo) / (hi - lo)
        out.append(SPARK_BLOCKS[min(len(SPARK_BLOCKS) - 1, int(frac * len(SPARK_BLOCKS)))])
    return "".join(out)


def _latest(values: list[float | None]) -> float | None:
    for v in reversed(values):
        if v is not None:
            return v
    return None


def _notes(state: DashboardState, fallback: str) -> Text:
    return Text("\n".join(state.notes) if state.notes else fallback, style="dim italic")


def _truncate(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: max(0, n - 1)] + "…"


# --------------------------------------------------------------------------- panels


def _header(state: DashboardState) -> RenderableType:
    t = Text()
    t.append("moeyard top", style="bold")
    t.append("  ·  ")
    t.append(state.model or "?", style="bold cyan")
    t.append("  ·  " + _fmt_time(state.time, date=True))
    t.append("  ·  epoch ")
    t.append(str(state.placement.epoch) if state.placement is not None else "–", style="bold")
    t.append("  ·  Redis ")
    if state.redis_ok:
        t.append("ok", style="bold green")
    else:
        t.append("err", style="bold red")
        if state.redis_error:
            t.append(f" ({_truncate(state.redis_error, 60)})", style="red")
    t.append("  ·  min balancedness now ")
    now = _latest(state.shard_series.min_balancedness) if state.shard_series is not None else None
    t.append_text(_bal_text(now))
    t.append(f"  ·  lookback {state.lookback_s:g}s", style="dim")
    lines: list[RenderableType] = [t]
    b = state.balancer
    if b is not None:
        lines.append(Text(
            "last rebalance " + ("none stored" if b.seconds_since_rebalance is None
                                 else f"{b.seconds_since_rebalance:.0f}s ago")
            + " · autoscaler turn " + ("never" if b.seconds_since_turn is None else f"{b.seconds_since_turn:.0f}s ago"),
            style="bold red" if b.stalled else "dim"))
    for w in state.warnings:
        lines.append(Text("warning: " + w, style="bold red"))
    eco = state.economics
    if eco is not None:
        lines.append(Text(
            f"{eco.family} · {eco.num_moe_layers}/{eco.num_layers} MoE layers × {eco.num_experts} experts, "
            f"top-{eco.top_k} · {eco.total_params / 1e9:.2f}B total, {eco.active_params / 1e9:.2f}B active "
            f"(≈{eco.dense_equivalent_params / 1e9:.2f}B dense-equivalent)", style="dim"))
    return Group(*lines)


def _heatmap(state: DashboardState, width: int | None) -> RenderableType:
    hm = state.heatmap
    if hm is None or not hm.rate:
        return Panel(_notes(state, "no load recorded yet"), title="expert load (tokens/s)", title_align="left")
    hot = {(int(l), int(e)) for l, e in hm.hot}
    cold = {(int(l), int(e)) for l, e in hm.cold}
    starved = {**{(int(l), int(e)): COLLAPSED_MARK for l, e in hm.collapsed},
               **{(int(l), int(e)): DEAD_MARK for l, e in hm.dead}}
    num_experts = max(len(row) for row in hm.rate)
    peak = max((x for row in hm.rate for x in row if x is not None), default=0.0)
    # experts per table: all of them, or as many as fit in ``width`` (layer column + border)
    per_table = num_experts if width is None else max(1, (width - 10) // (_HEAT_CELL + 1))
    tables: list[RenderableType] = []
    for start in range(0, num_experts, per_table):
        experts = range(start, min(num_experts, start + per_table))
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, collapse_padding=True,
                      show_edge=False)
        table.add_column("layer", justify="right", style="bold", no_wrap=True)
        for e in experts:
            table.add_column(f" e{e}", justify="right", no_wrap=True, min_width=_HEAT_CELL + 1)
        for layer, row in enumerate(hm.rate):
            cells: list[RenderableType] = [Text(f"L{layer} ")]
            for e in experts:
                x = row[e] if e < len(row) else None
                if (layer, e) in starved:                       # collapsed or dead over many windows
                    cells.append(Text(starved[(layer, e)] + " ", style="bold red"))
                    continue
                if (layer, e) in cold:
                    cells.append(Text(COLD_MARK + " ", style="dim"))
                    continue
                if x is None:
                    cells.append(Text("– ", style="dim"))
                    continue
                style = _ramp_style(x / peak if peak > 0 else 0.0)
                if (layer, e) in hot:
                    cells.append(Text(" " + _fmt_rate(x) + HOT_MARK, style=style + Style(bold=True)))
                else:
                    cells.append(Text(" " + _fmt_rate(x) + " ", style=style))
            table.add_row(*cells)
        tables.append(table)
    legend = Text("0 ", style="dim")
    for i in range(len(RAMP)):
        legend.append("  ", style=Style(bgcolor=RAMP[i]))
    legend.append(f" {_fmt_rate(peak)} tok/s", style="dim")
    legend.append(f"   {HOT_MARK} hot (≥{hm.hot_factor:g}× layer mean)   {COLD_MARK} cold (no tokens)", style="dim")
    legend.append(f"   {COLLAPSED_MARK} collapsed (<{hm.collapse_fraction:g}× layer mean, {hm.collapse_windows} "
                  f"windows: {len(hm.collapsed)})   {DEAD_MARK} dead ({len(hm.dead)})", style="dim")
    title = f"expert load (tokens/s over the last {hm.span_s:g}s, windows of {hm.window_s:g}s)"
    return Panel(Group(*tables, legend), title=title, title_align="left")


def _latest_window(ss: ShardSeries) -> int | None:
    """The newest window in which some layer has shard rates."""
    num_windows = len(ss.times)
    for w in range(num_windows - 1, -1, -1):
        if any(w < len(layer) and layer[w] is not None and any(x is not None for x in layer[w])
               for layer in ss.rate):
            return w
    return None


def _layers(state: DashboardState, width: int | None) -> RenderableType:
    ss = state.shard_series
    if ss is None or not ss.rate or not ss.times:
        return Panel(_notes(state, "no load windows yet"), title="shards per layer", title_align="left")
    w = _latest_window(ss)
    n = ss.num_shards
    spark_len = 60 if width is None else max(8, width - 8 - 9 * n - 9 - 10)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right", style="bold", no_wrap=True)
    for s in range(n):
        table.add_column(f"shard {s}", justify="right", no_wrap=True)
    table.add_column("balanced", justify="right", no_wrap=True)
    table.add_column(f"balancedness, last {min(spark_len, len(ss.times))} windows", no_wrap=True)
    for layer, windows in enumerate(ss.rate):
        row = windows[w] if w is not None and w < len(windows) else None
        rates = [row[s] if row is not None and s < len(row) else None for s in range(n)]
        bal = ss.balancedness[layer] if layer < len(ss.balancedness) else []
        table.add_row(f"L{layer}", *[_fmt_rate(x) for x in rates], _bal_text(_latest(bal)),
                      Text(sparkline(bal[-spark_len:]), style=_bal_style(_latest(bal))))
    mins = ss.min_balancedness
    table.add_row(Text("min", style="bold"), *["" for _ in range(n)], _bal_text(_latest(mins)),
                  Text(sparkline(mins[-spark_len:]), style=_bal_style(_latest(mins))))
    when = f", window at {_fmt_time(ss.times[w])}" if w is not None else ""
    return Panel(table, title=f"tokens/s per shard{when}", title_align="left")


def _placement(state: DashboardState) -> RenderableType:
    pl = state.placement
    if pl is None or not pl.phy2log:
        return Panel(_notes(state, "no placement published yet"), title="placement", title_align="left")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right", style="bold", no_wrap=True)
    for s in range(pl.num_shards):
        table.add_column(f"shard {s}")
    for layer, slots in enumerate(pl.phy2log):
        copies = pl.copies[layer] if layer < len(pl.copies) else []
        cells = []
        for s in range(pl.num_shards):
            mine = slots[s * pl.slots_per_shard:(s + 1) * pl.slots_per_shard]
            cell = Text()
            for i, e in enumerate(mine):
                if i:
                    cell.append(" ")
                if 0 <= e < len(copies) and copies[e] > 1:
                    cell.append(f"{e}{REPLICA_MARK}", style="bold magenta")
                else:
                    cell.append(str(e))
            cells.append(cell)
        table.add_row(f"L{layer}", *cells)
    title = (f"placement (epoch {pl.epoch}, {pl.num_shards} shards × {pl.slots_per_shard} slots, "
             f"{REPLICA_MARK} = replicated)")
    return Panel(table, title=title, title_align="left")


def _serving(state: DashboardState) -> RenderableType:
    sv = state.serving
    summary = Text()
    summary.append(f"running {sv.running}", style="bold")
    summary.append(f"  ·  waiting {sv.waiting}", style="bold yellow" if sv.waiting else "bold")
    summary.append(f"  ·  {_fmt_rate(sv.tokens_per_s)} tok/s")
    summary.append(f"  ·  TTFT p50/p99 {_fmt_ms(sv.ttft_p50_s)}/{_fmt_ms(sv.ttft_p99_s)} ms")
    summary.append(f"  ·  ITL p50/p99 {_fmt_ms(sv.itl_p50_s)}/{_fmt_ms(sv.itl_p99_s)} ms")
    parts: list[RenderableType] = [summary]
    if sv.replicas:
        reps = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name, justify in (("replica", "left"), ("run", "right"), ("wait", "right"), ("KV cache", "right"),
                              ("epoch", "right"), ("tok/s", "right"), ("TTFT p50/p99 ms", "right"),
                              ("ITL p50/p99 ms", "right"), ("done", "right"), ("failed", "right"),
                              ("age", "right")):
            reps.add_column(name, justify=justify, no_wrap=True)
        for r in sv.replicas:
            kv = r.kv_cache_usage * 100
            reps.add_row(r.replica, str(r.running), str(r.waiting),
                         Text(f"{kv:.0f}%", style="bold red" if kv >= 90 else "yellow" if kv >= 70 else ""),
                         "–" if r.placement_epoch is None else str(r.placement_epoch), _fmt_rate(r.tokens_per_s),
                         f"{_fmt_ms(r.ttft_p50_s)}/{_fmt_ms(r.ttft_p99_s)}",
                         f"{_fmt_ms(r.itl_p50_s)}/{_fmt_ms(r.itl_p99_s)}", str(r.requests_finished),
                         Text(str(r.requests_failed), style="red" if r.requests_failed else ""),
                         Text(f"{r.age_s:.0f}s", style="yellow" if r.age_s > 30 else ""))
        parts.append(reps)
    else:
        parts.append(Text("no replica has published telemetry", style="dim italic"))
    if sv.shards:
        shards = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for name, justify in (("shard", "right"), ("healthy", "left"), ("address", "left"), ("slots", "right"),
                              ("weights MiB", "right"), ("RSS MiB", "right"), ("tokens", "right")):
            shards.add_column(name, justify=justify, no_wrap=name != "healthy")
        for s in sv.shards:
            ok = Text("yes", style="green") if s.healthy else Text(
                "NO" + (f" ({_truncate(s.error, 40)})" if s.error else ""), style="bold red")
            shards.add_row(str(s.shard_id), ok, s.address or "–", str(s.slots), _fmt_mib(s.weight_bytes),
                           _fmt_mib(s.rss_bytes), str(s.tokens))
        parts.append(shards)
    else:
        parts.append(Text("no shard status", style="dim italic"))
    return Panel(Group(*parts), title="serving", title_align="left")


def _arrow(a: Any, b: Any, fmt: Callable[[Any], str] = str) -> str:
    if a is None and b is None:
        return "–"
    return f"{'–' if a is None else fmt(a)}→{'–' if b is None else fmt(b)}"


def _events(state: DashboardState, width: int | None) -> RenderableType:
    if not state.events:
        return Panel(_notes(state, "no autoscaler events yet"), title="autoscaler events", title_align="left")
    reason_len = 60 if width is None else max(16, width - 80)  # the other columns take ~77 with the border
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name, justify in (("time", "left"), ("kind", "left"), ("reason", "left"), ("epoch", "right"),
                          ("planned", "right"), ("measured", "right"), ("took", "right")):
        table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis",
                         max_width=reason_len if name == "reason" else None)
    for ev in state.events[:MAX_EVENTS]:
        kind_style = ("bold red" if ev.kind.endswith("failed") else "dim" if ev.kind == "skip"
                      else "bold green" if ev.kind in ("rebalance", "scale_up", "scale_down") else "")
        table.add_row(_fmt_time(ev.time), Text(ev.kind, style=kind_style), _truncate(ev.reason, reason_len),
                      _arrow(ev.epoch_before, ev.epoch_after),
                      _arrow(ev.balancedness_before, ev.balancedness_after, _fmt_bal),
                      _arrow(ev.measured_before, ev.measured_after, _fmt_bal),
                      "–" if ev.duration_s is None else f"{ev.duration_s:.1f}s")
    more = len(state.events) - MAX_EVENTS
    title = "autoscaler events (newest first" + (f", {more} older not shown)" if more > 0 else ")")
    return Panel(table, title=title, title_align="left")


def render(state: DashboardState, width: int | None = None) -> RenderableType:
    """The whole view of ``state``; ``width`` (columns) splits a wide heatmap and sizes sparklines."""
    return Group(_header(state), _heatmap(state, width), _layers(state, width), _placement(state),
                 _serving(state), _events(state, width))


# --------------------------------------------------------------------------- command


def _error_frame(message: str, url: str, last: DashboardState | None, width: int) -> RenderableType:
    banner = Text(f"error: {message}  (retrying; {url})", style="bold red")
    if last is None:
        return banner
    return Group(banner, Text(f"showing the state of {_fmt_time(last.time)}", style="dim"), render(last, width))


def run_top(url: str, token: str | None, lookback_s: float, interval_s: float, once: bool,
            console: Console | None = None) -> int:
    """Draw the dashboard state: one frame (``once``) or refreshed every ``interval_s`` until Ctrl-C."""
    console = console or Console()
    if once:
        try:
            state = fetch_state(url, token, lookback_s)
        except DashboardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        console.print(render(state, console.width))
        return 0

    from rich.live import Live

    last: DashboardState | None = None

    def frame() -> RenderableType:
        nonlocal last
        width = console.width
        try:
            last = fetch_state(url, token, lookback_s, timeout_s=max(1.0, min(5.0, interval_s * 2)))
        except DashboardError as e:
            return _error_frame(str(e), url, last, width)
        footer = Text(f"refresh every {interval_s:g}s · Ctrl-C to quit", style="dim")
        return Group(render(last, width), footer)

    try:
        with Live(frame(), console=console, screen=console.is_terminal, auto_refresh=False,
                  vertical_overflow="crop") as live:
            while True:
                time.sleep(interval_s)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        return 0
