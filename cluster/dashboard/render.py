"""Server-rendered panels of the operator dashboard: HTML fragments with inline SVG.

:func:`render_panels` turns one :class:`~moeyard.cluster.dashboard.state.DashboardState`
into ``{panel name: HTML fragment}``; the dashboard's ``GET /api/panels`` returns
it and the page (``static/dashboard.js``) drops each fragment into its section.
Everything here is pure (no I/O) and uses the standard library only.

Panels (keys of :data:`PANELS`), each rendered in its own module:

* ``heatmap``, ``shards``: :mod:`moeyard.cluster.dashboard.render_load`;
* ``placement``, ``timeline``: :mod:`moeyard.cluster.dashboard.render_ops`;
* ``serving``, ``economics``: :mod:`moeyard.cluster.dashboard.render_serving`.

They share :mod:`moeyard.cluster.dashboard.fmt` (number formatting),
:mod:`moeyard.cluster.dashboard.svg` (colours, scales, axes, lines) and
:mod:`moeyard.cluster.dashboard.fragments` (tables, legends, the empty-panel text).

Every string that comes from the state is escaped with :func:`html.escape`; the
SVG fragments are well-formed XML. Shapes use ``L`` MoE layers, ``E`` logical
experts, ``P`` physical slots, ``N`` shards, ``W`` load windows.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from moeyard.cluster.dashboard.fmt import (
    fmt_bytes,
    fmt_clock,
    fmt_frac,
    fmt_params,
    fmt_rate,
    fmt_seconds,
)
from moeyard.cluster.dashboard.render_load import render_heatmap, render_shards
from moeyard.cluster.dashboard.render_ops import render_placement, render_timeline
from moeyard.cluster.dashboard.render_serving import render_economics, render_serving
from moeyard.cluster.dashboard.state import DashboardState
from moeyard.cluster.dashboard.svg import heat_color

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
            why = f"{escape(type(e).__name__)}: {escape(str(e))}"
            out[name] = f'<p class="panel-error">could not render {name}: {why}</p>'
    return out
