"""``deploy/grafana/moeyard-dashboard.json``: well formed, and its PromQL uses exactly the cluster's metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "moeyard-dashboard.json"

EXPECTED_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    # gauges
    "moeyard:num_requests_running": ("gauge", ("replica",)),
    "moeyard:num_requests_waiting": ("gauge", ("replica",)),
    "moeyard:kv_cache_usage_perc": ("gauge", ("replica",)),
    "moeyard:placement_epoch": ("gauge", ("replica",)),
    "moeyard:balancedness": ("gauge", ("layer",)),
    "moeyard:min_balancedness": ("gauge", ()),
    "moeyard:shard_up": ("gauge", ("shard",)),
    "moeyard:shard_weight_bytes": ("gauge", ("shard",)),
    "moeyard:shard_rss_bytes": ("gauge", ("shard",)),
    "moeyard:shard_slots": ("gauge", ("shard",)),
    "moeyard:redis_up": ("gauge", ()),
    # histograms (``_bucket{le}``, ``_sum``, ``_count``)
    "moeyard:time_to_first_token_seconds": ("histogram", ("replica",)),
    "moeyard:inter_token_latency_seconds": ("histogram", ("replica",)),
    "moeyard:e2e_request_latency_seconds": ("histogram", ("replica",)),
    "moeyard:rebalance_duration_seconds": ("histogram", ()),
    # counters
    "moeyard:prompt_tokens_total": ("counter", ("replica",)),
    "moeyard:generation_tokens_total": ("counter", ("replica",)),
    "moeyard:request_success_total": ("counter", ("replica", "finished_reason")),
    "moeyard:request_failure_total": ("counter", ("replica", "reason")),
    "moeyard:load_flush_failures_total": ("counter", ("replica",)),
    "moeyard:load_tokens_dropped_total": ("counter", ("replica",)),
    "moeyard:expert_tokens_total": ("counter", ("replica", "layer", "shard")),
    "moeyard:expert_tokens_by_expert_total": ("counter", ("replica", "layer", "expert")),
    "moeyard:rebalances_total": ("counter", ("kind", "outcome")),
    "moeyard:slots_moved_total": ("counter", ()),
    "moeyard:migrated_bytes_total": ("counter", ()),
    "moeyard:moe_overflow_total": ("counter", ("replica", "layer", "outcome")),
    "moeyard:collapsed_experts": ("gauge", ("layer",)),
    "moeyard:dead_experts": ("gauge", ("layer",)),
    "moeyard:autoscaler_seconds_since_turn": ("gauge", ()),
    "moeyard:seconds_since_rebalance": ("gauge", ()),
}
"""Every series family the cluster's ``/metrics`` exposes: name -> (type, labels)."""

OPTIONAL_METRICS = {"moeyard:expert_tokens_by_expert_total", "moeyard:moe_overflow_total",
                    "moeyard:seconds_since_rebalance"}
"""Exposed only when per-expert metrics are enabled, with a capacity factor, or after a rebalance: the
dashboard may use them but need not."""

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_RE = re.compile(r"moeyard:[a-zA-Z0-9_:]+")
"""Digits included: ``moeyard:e2e_request_latency_seconds``."""
SELECTOR_RE = re.compile(r"(moeyard:[a-zA-Z0-9_:]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def family(name: str) -> str:
    """``name`` without a histogram's ``_bucket`` / ``_sum`` / ``_count`` suffix."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and EXPECTED_METRICS.get(base, ("",))[0] == "histogram":
            return base
    return name


def labels_of(name: str) -> set[str]:
    kind, labels = EXPECTED_METRICS[family(name)]
    return set(labels) | ({"le"} if kind == "histogram" and name.endswith("_bucket") else set())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, also those nested in collapsed rows."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def data_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def exprs(dashboard: dict) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query target."""
    return [(p["title"], t["expr"]) for p in data_panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict) -> list[str]:
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def test_loads_and_is_a_recent_schema(dashboard):
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["title"] and dashboard["uid"]
    assert {p["title"] for p in all_panels(dashboard) if p["type"] == "row"} >= {
        "Serving", "Expert load", "Autoscaler", "Redis"}


def test_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for p in data_panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}", v["name"]


def test_panel_ids_unique_and_grid_positions_set(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(g), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        boxes.append((p["title"], g))
    for i, (ta, a) in enumerate(boxes):  # no two panels overlap
        for tb, b in boxes[i + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                     or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])
            assert apart, (ta, tb)


def test_every_panel_has_a_target(dashboard):
    for p in data_panels(dashboard):
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip() and t.get("refId"), p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]


def test_exprs_use_only_known_metrics_and_labels(dashboard):
    queries = exprs(dashboard) + [("variable", q) for q in variable_queries(dashboard)]
    assert queries
    for title, expr in queries:
        names = METRIC_RE.findall(expr)
        assert names, (title, expr)
        for name in names:
            assert family(name) in EXPECTED_METRICS, (title, name)
        for name, matchers in SELECTOR_RE.findall(expr):  # {label=...} on the metric's own labels
            assert set(MATCHER_RE.findall(matchers)) <= labels_of(name), (title, expr)
        known = set().union(*(labels_of(n) for n in names))  # by (...) groups on labels the operands carry
        for grouping in GROUPING_RE.findall(expr):
            wanted = {x.strip() for x in grouping.split(",") if x.strip()}
            assert wanted <= known, (title, expr)


def test_histograms_queried_through_buckets(dashboard):
    for title, expr in exprs(dashboard):
        for name in METRIC_RE.findall(expr):
            if EXPECTED_METRICS.get(family(name), ("",))[0] == "histogram":
                assert name != family(name), f"{title}: use {name}_bucket/_sum/_count, not the family name"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by\s*\([^)]*\ble\b", expr), (title, expr)


def test_every_metric_is_charted(dashboard):
    used = {family(name) for _, expr in exprs(dashboard) for name in METRIC_RE.findall(expr)}
    missing = set(EXPECTED_METRICS) - OPTIONAL_METRICS - used
    assert not missing, sorted(missing)


def test_key_queries_present(dashboard):
    flat = {re.sub(r"\s+", "", e) for _, e in exprs(dashboard)}
    assert any("sum(rate(moeyard:generation_tokens_total" in e and "[1m]))" in e for e in flat)
    assert "sumby(layer,shard)(rate(moeyard:expert_tokens_total[1m]))" in flat
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        for q in ("0.5", "0.99"):
            assert any(e.startswith(f"histogram_quantile({q},sumby(le)(rate(moeyard:{hist}_bucket") for e in flat)
    heatmaps = [p for p in data_panels(dashboard) if p["type"] == "heatmap"]
    assert any("moeyard:expert_tokens_total" in t["expr"] for p in heatmaps for t in p["targets"])
