"""HTML pieces shared by the dashboard's panels: the empty-panel text, tables, legends, the time window."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from moeyard.cluster.dashboard.state import DashboardState

__all__ = ["empty", "swatches", "table", "td", "time_domain"]


def empty(state: DashboardState, what: str) -> str:
    """The explanatory text of an empty panel: ``what`` plus the state's notes (escaped)."""
    notes = list(state.notes)
    if not state.redis_ok and state.redis_error:
        notes.append(f"Redis: {state.redis_error}")
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f'<div class="empty"><p>{escape(what)}</p>' + (f'<ul class="notes">{items}</ul>' if items else "") + "</div>"


def time_domain(state: DashboardState, times: Sequence[float]) -> tuple[float, float]:
    """``[now - lookback, now]``, widened to include every window start in ``times``."""
    now = state.time
    lo = now - state.lookback_s if state.lookback_s > 0 else (min(times) if times else now - 60.0)
    if times:
        lo = min(lo, min(times))
        now = max(now, max(times))
    if now - lo < 1.0:
        lo = now - 1.0
    return lo, now


def table(headers: Sequence[str], rows: Iterable[str], cls: str) -> str:
    """A ``<table>`` with a header row of (already safe) ``headers`` and pre-rendered ``<tr>`` rows."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def td(text: str, cls: str = "") -> str:
    """A cell with already-escaped ``text``."""
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def swatches(items: Iterable[tuple[str, str]], cls: str) -> str:
    """An HTML legend: ``(colour, label)`` pairs (labels already escaped)."""
    spans = "".join(f'<span class="swatch"><i style="background:{c}"></i>{label}</span>' for c, label in items)
    return f'<div class="legend {cls}">{spans}</div>'
