"""Server-rendered dashboard panels: real content per panel, escaping, well-formed SVG, the static page."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from moeyard.cluster.dashboard.render import (
    PANELS,
    fmt_bytes,
    fmt_params,
    fmt_seconds,
    heat_color,
    render_panels,
)
from moeyard.cluster.dashboard.state import (
    DashboardState,
    EventView,
    HeatmapView,
    PlacementView,
    ReplicaHealth,
    ServingView,
    ShardHealth,
    ShardSeries,
)
from moeyard.model.economics import Economics

STATIC = Path(__file__).resolve().parents[3] / "cluster" / "dashboard" / "static"
NOW = 1_700_000_000.0
EVIL = 'imbalance <script>alert("x")</script> & more'
VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "source", "wbr"}


# --------------------------------------------------------------------------- a tiny DOM


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None = None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        """All text inside, in document order."""
        out = []
        for p in self.parts:
            out.append(p.text if isinstance(p, Node) else p)
        return "".join(out)

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        """Elements with ``tag``, whose class list holds ``cls`` and whose ``data_x`` attributes match."""
        out = []
        for n in self.iter():
            if tag is not None and n.tag != tag:
                continue
            if cls is not None and cls not in (n.attrs.get("class") or "").split():
                continue
            if any(n.attrs.get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            out.append(n)
        return out


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.cur.parts.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.cur.parts.append(node)

    def handle_endtag(self, tag):
        n = self.cur
        while n is not self.root and n.tag != tag:
            n = n.parent
        assert n is not self.root, f"unmatched </{tag}>"
        self.cur = n.parent

    def handle_data(self, data):
        self.cur.parts.append(data)


def dom(fragment: str) -> Node:
    b = _Builder()
    b.feed(fragment)
    b.close()
    assert b.cur is b.root, f"unclosed <{b.cur.tag}>"
    return b.root


def svgs(fragment: str) -> list[ET.Element]:
    """Every ``<svg>...</svg>`` element of the fragment, parsed as XML (fails on malformed SVG)."""
    found = re.findall(r"<svg\b.*?</svg>", fragment, flags=re.DOTALL)
    return [ET.fromstring(s) for s in found]


# --------------------------------------------------------------------------- states


def full_state() -> DashboardState:
    """2 MoE layers x 4 experts on 2 shards x 3 slots; expert 1 (layer 0) / 2 (layer 1) replicated."""
    placement = PlacementView(
        epoch=7, num_shards=2, slots_per_shard=3,
        phy2log=[[0, 1, 2, 1, 3, 1], [0, 2, 1, 3, 2, 2]],
        copies=[[1, 3, 1, 1], [1, 1, 3, 1]],
    )
    heatmap = HeatmapView(
        window_s=10.0, span_s=30.0,
        rate=[[10.0, 95.5, 20.0, 15.25], [30.0, 25.0, 40.0, 0.0]],
        hot=[[0, 1]], cold=[[1, 3]], hot_factor=2.0,
    )
    times = [NOW - 50 + 10 * i for i in range(5)]
    series = ShardSeries(
        times=times,
        rate=[
            [[40.0, 80.0], [45.0, 85.0], [None, None], [60.0, 62.0], [58.0, 61.0]],
            [[30.0, 35.0], [32.0, 33.0], [31.0, 34.0], [33.0, 30.0], [29.0, 31.0]],
        ],
        balancedness=[[0.75, 0.76, None, 0.98, 0.97], [0.93, 0.98, 0.95, 0.95, 0.97]],
        min_balancedness=[0.75, 0.76, 0.95, 0.95, 0.97],
        num_shards=2,
    )
    events = [
        EventView(kind="skip", reason=EVIL, time=NOW - 5),
        EventView(kind="rebalance", reason="layer 0 balancedness 0.75 < 0.9", time=NOW - 25,
                  epoch_before=6, epoch_after=7, balancedness_before=0.751, balancedness_after=0.982,
                  duration_s=1.234, slots_moved=3, bytes_loaded=3 * 66 * 2**20,
                  measured_before=0.755, measured_after=None),
    ]
    serving = ServingView(
        replicas=[
            ReplicaHealth(replica="r-0", running=3, waiting=1, kv_cache_usage=0.42, num_blocks=512,
                          placement_epoch=7, tokens_per_s=120.5, ttft_p50_s=0.081, ttft_p99_s=0.35,
                          itl_p50_s=0.012, itl_p99_s=0.048, requests_finished=40, requests_failed=1, age_s=1.2),
            ReplicaHealth(replica="r-1 <b>", running=0, waiting=0, kv_cache_usage=0.0, num_blocks=512,
                          placement_epoch=None, tokens_per_s=0.0, ttft_p50_s=None, ttft_p99_s=None,
                          itl_p50_s=None, itl_p99_s=None, requests_finished=0, requests_failed=0, age_s=30.0),
        ],
        shards=[
            ShardHealth(shard_id=0, healthy=True, address="10.0.0.5:50051", slots=6,
                        weight_bytes=198 * 2**20, rss_bytes=int(1.5 * 2**30), tokens=123456),
            ShardHealth(shard_id=1, healthy=False, address=None, slots=6, error="connection refused <eof>"),
        ],
        running=3, waiting=1, tokens_per_s=120.5,
        ttft_p50_s=0.081, ttft_p99_s=0.35, itl_p50_s=0.012, itl_p99_s=0.048,
    )
    economics = Economics(
        family="mixtral", num_layers=2, num_moe_layers=2, num_experts=4, top_k=2,
        total_params=7_500_000_000, active_params=1_200_000_000, routed_expert_params=6_000_000_000,
        dense_equivalent_params=7.5e9 / (4 ** 0.44 / 2 ** 0.63), bytes_per_param=2,
    )
    return DashboardState(time=NOW, model="tiny-mixtral", redis_ok=True, redis_error=None,
                          placement=placement, heatmap=heatmap, shard_series=series, events=events,
                          serving=serving, economics=economics, lookback_s=120.0, notes=[])


EMPTY_NOTES = ["no Redis configured", "no load windows yet"]


def empty_state() -> DashboardState:
    serving = ServingView(replicas=[], shards=[], running=0, waiting=0, tokens_per_s=0.0,
                          ttft_p50_s=None, ttft_p99_s=None, itl_p50_s=None, itl_p99_s=None)
    return DashboardState(time=NOW, model="m", redis_ok=False, redis_error=None, placement=None, heatmap=None,
                          shard_series=None, events=[], serving=serving, economics=None, lookback_s=300.0,
                          notes=list(EMPTY_NOTES))


@pytest.fixture(scope="module")
def panels() -> dict[str, str]:
    return render_panels(full_state())


# --------------------------------------------------------------------------- helpers


def test_formatting_helpers():
    assert fmt_params(7.5e9) == "7.50 B"
    assert fmt_params(1.23e7) == "12.3 M"
    assert fmt_params(512) == "512"
    assert fmt_bytes(198 * 2**20) == "198 MiB"
    assert fmt_bytes(int(1.5 * 2**30)) == "1.50 GiB"
    assert fmt_bytes(12) == "12 B"
    assert fmt_bytes(None) == "–"
    assert fmt_seconds(0.123) == "123 ms"
    assert fmt_seconds(2.5) == "2.50 s"
    assert fmt_seconds(None) == "–"
    assert heat_color(0.0) == "#fff7ec" and heat_color(1.0) == "#7f0000"
    assert heat_color(0.5) == "#fd8d3c" and heat_color(7.0) == "#7f0000"


def test_panel_keys_and_no_errors(panels):
    assert list(panels) == list(PANELS) == ["heatmap", "shards", "placement", "timeline", "serving", "economics"]
    for name, html in panels.items():
        assert "panel-error" not in html, (name, html)
        dom(html)  # balanced tags


def test_svg_fragments_are_well_formed_xml(panels):
    total = 0
    for name, html in panels.items():
        opened = len(re.findall(r"<svg\b", html))
        parsed = svgs(html)
        assert len(parsed) == opened, name
        total += len(parsed)
    # heatmap, 2 layer charts + balancedness, event strip, economics bar
    assert total == 6


# --------------------------------------------------------------------------- heatmap


def test_heatmap_one_cell_per_layer_expert(panels):
    state = full_state()
    root = dom(panels["heatmap"])
    (svg,) = root.find_all("svg")
    assert svg.attrs["id"] == "heatmap-svg"
    cells = root.find_all("rect", "cell")
    assert len(cells) == 2 * 4
    hot, cold = {(0, 1)}, {(1, 3)}
    for layer in range(2):
        for expert in range(4):
            (cell,) = root.find_all("rect", "cell", data_layer=str(layer), data_expert=str(expert))
            want = "hot" if (layer, expert) in hot else "cold" if (layer, expert) in cold else "normal"
            assert cell.attrs["data-state"] == want
            assert float(cell.attrs["data-rate"]) == state.heatmap.rate[layer][expert]
            (title,) = cell.find_all("title")
            assert title.text.startswith(f"layer {layer} expert {expert}: ")
    (hot_cell,) = root.find_all("rect", "cell", data_state="hot")
    assert (hot_cell.attrs["data-layer"], hot_cell.attrs["data-expert"]) == ("0", "1")
    assert hot_cell.find_all("title")[0].text == "layer 0 expert 1: 95.5 tok/s (hot)"
    (cold_cell,) = root.find_all("rect", "cell", data_state="cold")
    assert (cold_cell.attrs["data-layer"], cold_cell.attrs["data-expert"]) == ("1", "3")
    assert cold_cell.attrs["fill"] == "url(#hm-cold)"
    # the hottest cell gets the top colour, the others lighter ones; hot cells are outlined
    assert hot_cell.attrs["fill"] == "#7f0000"
    assert root.find_all("rect", "cell", data_layer="0", data_expert="0")[0].attrs["fill"] != "#7f0000"
    assert len(root.find_all("rect", "hot-mark")) == 1
    assert "max 95.5 tok/s" in root.text
    assert {n.text for n in root.find_all("text", "label-expert")} == {"0", "1", "2", "3"}
    assert {n.text for n in root.find_all("text", "label-layer")} == {"0", "1"}


def test_heatmap_marks_collapsed_and_dead_experts_apart_from_cold():
    state = full_state()
    state.heatmap.collapsed, state.heatmap.dead = [[0, 2]], [[1, 3]]     # dead takes precedence over cold
    state.heatmap.collapse_fraction, state.heatmap.collapse_windows = 0.1, 6
    root = dom(render_panels(state)["heatmap"])
    states = {(c.attrs["data-layer"], c.attrs["data-expert"]): (c.attrs["data-state"], c.attrs["fill"])
              for c in root.find_all("rect", "cell")}
    assert states[("0", "2")] == ("collapsed", "url(#hm-collapsed)")
    assert states[("1", "3")] == ("dead", "url(#hm-dead)")
    assert states[("0", "1")][0] == "hot" and [s for s, _ in states.values()].count("normal") == 5
    assert "1 collapsed, 1 dead" in root.text and "below 0.1× its layer's mean" in root.text
    svgs(render_panels(state)["heatmap"])                               # still well-formed SVG


def test_serving_shows_the_balancer_and_its_warning():
    from moeyard.cluster.dashboard.state import BalancerView

    state = full_state()
    state.balancer = BalancerView(seconds_since_rebalance=125.0, seconds_since_turn=400.0, stalled=True)
    state.warnings = ["the autoscaler has not finished a turn for 400 s: <stalled>"]
    root = dom(render_panels(state)["serving"])
    (warning,) = root.find_all("p", "warning")
    assert warning.text == "the autoscaler has not finished a turn for 400 s: <stalled>"   # escaped, shown
    (bal,) = root.find_all("p", "balancer")
    assert bal.attrs["data-stalled"] == "true" and bal.attrs["data-since-rebalance"] == "125.000"
    assert "last rebalance" in bal.text and "autoscaler turn" in bal.text


# --------------------------------------------------------------------------- shards


def test_shard_charts_and_balancedness(panels):
    root = dom(panels["shards"])
    charts = root.find_all("svg", "shard-chart")
    assert [c.attrs["data-layer"] for c in charts] == ["0", "1"]
    # layer 0 has an incomplete window (None) in the middle: each shard's line breaks into two runs
    for shard in ("0", "1"):
        runs = root.find_all("polyline", "shard-line", data_layer="0", data_shard=shard)
        assert len(runs) == 2
        assert [len(r.attrs["points"].split()) for r in runs] == [2, 2]
        (run,) = root.find_all("polyline", "shard-line", data_layer="1", data_shard=shard)
        assert len(run.attrs["points"].split()) == 5
    ticks = [t.text for t in root.find_all("text", "tick")]
    assert "now" in ticks and "-60 s" in ticks
    (bal,) = root.find_all("svg", "balancedness-chart")
    assert len(bal.find_all("polyline", "bal-line", data_layer="0")) == 2
    assert len(bal.find_all("polyline", "bal-line", data_layer="1")) == 1
    assert len(bal.find_all("line", "bal-ref")) == 1
    # the rebalance is marked, the skip is not
    marks = bal.find_all("line", "event-mark")
    assert [m.attrs["data-kind"] for m in marks] == ["rebalance"]


def test_events_outside_range_are_not_marked():
    state = full_state()
    state.events = [EventView(kind="scale_up", reason="old", time=NOW - 10_000)]
    root = dom(render_panels(state)["shards"])
    assert root.find_all("line", "event-mark") == []


# --------------------------------------------------------------------------- placement


def test_placement_slots(panels):
    state = full_state()
    root = dom(panels["placement"])
    assert "placement epoch 7" in root.text
    slots = root.find_all("td", "slot")
    assert len(slots) == 2 * 6
    for layer, row in enumerate(state.placement.phy2log):
        for p, expert in enumerate(row):
            (box,) = root.find_all("td", "slot", data_layer=str(layer), data_slot=str(p))
            assert box.attrs["data-shard"] == str(p // 3)
            assert box.attrs["data-expert"] == str(expert)
            assert box.text == str(expert)
            replicated = state.placement.copies[layer][expert] > 1
            assert (box.attrs.get("data-replicated") == "1") == replicated
    assert [b.attrs["data-slot"] for b in root.find_all("td", "slot", data_layer="0", data_replicated="1")] == \
        ["1", "3", "5"]
    assert [b.attrs["data-slot"] for b in root.find_all("td", "slot", data_layer="1", data_replicated="1")] == \
        ["1", "4", "5"]
    # the unhealthy shard's row is flagged
    (row1,) = root.find_all("tr", "placement-row", data_shard="1")[:1]
    assert row1.attrs["data-healthy"] == "0"


# --------------------------------------------------------------------------- timeline


def test_timeline_rows_in_order_and_escaped(panels):
    state = full_state()
    html = panels["timeline"]
    root = dom(html)
    rows = root.find_all("tr", "event")
    assert [r.attrs["data-kind"] for r in rows] == [e.kind for e in state.events] == ["skip", "rebalance"]
    assert all(r.attrs["class"] == "event" for r in rows)
    reb = [c.text for c in rows[1].find_all("td")]
    assert reb[1] == "rebalance"
    assert reb[2] == "layer 0 balancedness 0.75 < 0.9"
    assert reb[3] == "6 → 7"
    assert reb[4] == "1.23 s"
    assert reb[5] == "3"
    assert reb[6] == "198 MiB"
    assert reb[7] == "0.751 → 0.982"
    assert reb[8] == "0.755 → –"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", reb[0])
    skip = [c.text for c in rows[0].find_all("td")]
    assert skip[2] == EVIL  # shown verbatim as text...
    assert skip[3] == "– → –"
    # ...because it was escaped: no live markup anywhere
    for name, fragment in panels.items():
        assert "<script" not in fragment, name
    assert "&lt;script&gt;" in html
    assert [t.attrs["data-kind"] for t in root.find_all("line", "event-tick")] == ["skip", "rebalance"]


# --------------------------------------------------------------------------- serving


def test_serving_tables(panels):
    root = dom(panels["serving"])
    assert [r.attrs["data-replica"] for r in root.find_all("tr", "replica")] == ["r-0", "r-1 <b>"]
    assert "<b>" not in panels["serving"]
    r0 = [c.text.strip() for c in root.find_all("tr", "replica", data_replica="r-0")[0].find_all("td")]
    assert r0[:3] == ["r-0", "3", "1"]
    assert "42%" in r0[3]
    assert r0[6] == "81.0 ms / 350 ms"
    assert r0[7] == "12.0 ms / 48.0 ms"
    shards = root.find_all("tr", "shard")
    assert [(s.attrs["data-shard"], s.attrs["data-healthy"]) for s in shards] == [("0", "1"), ("1", "0")]
    s0 = [c.text for c in shards[0].find_all("td")]
    assert s0[2] == "10.0.0.5:50051" and s0[4] == "198 MiB" and s0[5] == "1.50 GiB"
    s1 = [c.text for c in shards[1].find_all("td")]
    assert "down" in s1[1] and s1[7] == "connection refused <eof>"
    stats = {n.attrs["data-stat"]: n.text for n in root.find_all("span", "stat-value")}
    assert stats == {"running": "3", "waiting": "1", "tokens_per_s": "120.5", "ttft": "81.0 ms / 350 ms",
                     "itl": "12.0 ms / 48.0 ms"}
    (meta,) = root.find_all("div", "panel-meta")
    assert meta.attrs["data-model"] == "tiny-mixtral" and meta.attrs["data-redis"] == "ok"
    assert float(meta.attrs["data-time"]) == NOW


# --------------------------------------------------------------------------- economics


def test_economics(panels):
    root = dom(panels["economics"])
    assert "active 1.20 B of 7.50 B per token (16%)" in root.text
    assert "total ÷ (E^0.44 / A^0.63)" in root.text
    assert "6.00 B" in root.text  # routed experts
    rows = {r.find_all("th")[0].text: r.find_all("td")[0].text for r in root.find_all("tr")
            if r.find_all("th") and r.find_all("td")}
    assert rows["dense-equivalent estimate"] == fmt_params(7.5e9 / (4 ** 0.44 / 2 ** 0.63))
    assert rows["bytes / param"] == "2"
    assert rows["routed experts per MoE layer (E)"] == "4" and rows["experts per token (A, top-k)"] == "2"
    (active,) = root.find_all("rect", "econ-active")
    (inactive,) = root.find_all("rect", "econ-inactive")
    assert float(active.attrs["width"]) == pytest.approx(480 * 1.2 / 7.5, abs=0.01)
    assert float(active.attrs["width"]) + float(inactive.attrs["width"]) == pytest.approx(480, abs=0.02)
    mem = root.find_all("tr", "shard-memory")
    assert [m.attrs["data-shard"] for m in mem] == ["0", "1"]
    assert mem[0].find_all("td")[2].text == "198 MiB"


# --------------------------------------------------------------------------- empty state


def test_empty_state_renders_every_panel_with_notes():
    out = render_panels(empty_state())
    assert list(out) == list(PANELS)
    for name, html in out.items():
        assert "panel-error" not in html, (name, html)
        root = dom(html)
        for s in svgs(html):
            assert s.tag == "svg"
        if name != "serving":
            for note in EMPTY_NOTES:
                assert note in root.text, (name, note)
    assert dom(out["heatmap"]).find_all("rect", "cell") == []
    assert dom(out["timeline"]).find_all("tr", "event") == []
    assert dom(out["placement"]).find_all("td", "slot") == []
    serving = dom(out["serving"])
    assert serving.find_all("tr", "replica") == [] and serving.find_all("tr", "shard") == []
    assert "No replica has published telemetry." in serving.text
    assert serving.find_all("p", "redis")[0].attrs["data-redis"] == "error"


def test_partial_views_do_not_break():
    """Empty lists inside present views, an empty series: still no error."""
    state = full_state()
    state.heatmap.rate = []
    state.shard_series.times = []
    state.placement.phy2log = []
    out = render_panels(state)
    for name, html in out.items():
        assert "panel-error" not in html, name
        svgs(html)


# --------------------------------------------------------------------------- static page


def test_index_html_is_local_and_has_every_panel():
    html = (STATIC / "index.html").read_text()
    root = dom(html)
    refs = [n.attrs[a] for n in root.iter() for a in ("src", "href")
            if n.attrs.get(a) and n.attrs[a] != "data:,"]  # the empty favicon (no /favicon.ico request)
    assert refs, "expected the stylesheet and the script"
    for ref in refs:
        assert not re.match(r"^(https?:)?//", ref, flags=re.IGNORECASE), ref
        assert ref.startswith("/static/"), ref
        assert (STATIC / ref.removeprefix("/static/")).is_file(), ref
    assert "http://" not in html and "https://" not in html
    sections = {n.attrs.get("id") for n in root.find_all("section")}
    for name in render_panels(empty_state()):
        assert f"panel-{name}" in sections
        (sec,) = root.find_all("section", id=f"panel-{name}")
        assert sec.find_all("div", "panel-body")
    (meta,) = [m for m in root.find_all("meta") if m.attrs.get("name") == "referrer"]
    assert meta.attrs["content"] == "no-referrer"
    assert {o.attrs["value"] for o in root.find_all("option")} == {"60", "300", "900"}
    assert root.find_all("select", id="lookback")
    # tests wait on [data-updated]: it must appear only after the first successful update
    assert not [n for n in root.iter() if "data-updated" in n.attrs]


def test_dashboard_js_contract():
    js = (STATIC / "dashboard.js").read_text()
    assert "/api/panels?lookback=" in js
    assert 'credentials: "same-origin"' in js
    assert "session expired: reload and enter the token" in (STATIC / "index.html").read_text()
    assert "status === 401" in js
    assert "data-updated" in js
    assert "history.replaceState" in js
    assert "setTimeout" in js and "setInterval" not in js
    assert "http://" not in js and "https://" not in js
