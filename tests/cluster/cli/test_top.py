"""``moeyard top``: JSON round trip, the rendered frame, and the HTTP / CLI path against a tiny local server."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from rich.console import Console

from moeyard.cluster.cli.dashboard_client import state_from_dict
from moeyard.cluster.cli.top import COLD_MARK, COLLAPSED_MARK, DEAD_MARK, HOT_MARK, render, run_top, sparkline
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

TOKEN = "s3cret-token"
T0 = 1_750_000_000.0
HOT = (0, 2)  # layer 0, expert 2
COLD = (1, 3)  # layer 1, expert 3


def make_state() -> DashboardState:
    """2 MoE layers x 4 experts on 2 shards x 3 slots; expert 2 of layer 0 hot (and replicated), expert 3 of
    layer 1 dead."""
    placement = PlacementView(epoch=7, num_shards=2, slots_per_shard=3,
                              phy2log=[[0, 2, 1, 2, 3, 0], [0, 1, 2, 3, 1, 2]],
                              copies=[[2, 1, 2, 1], [1, 2, 2, 1]])
    heatmap = HeatmapView(window_s=10.0, span_s=60.0,
                          rate=[[120.0, 95.0, 812.5, 101.0], [300.0, 250.0, 275.5, 0.0]],
                          hot=[list(HOT)], cold=[list(COLD)], hot_factor=2.0)
    times = [T0 - 40, T0 - 30, T0 - 20, T0 - 10]
    series = ShardSeries(
        times=times,
        rate=[[[500.0, 520.0], [610.0, 300.0], [None, None], [654.25, 475.75]],
              [[400.0, 410.0], [415.0, 405.0], [None, None], [433.5, 391.0]]],
        balancedness=[[0.98, 0.74, None, 0.86], [0.99, 0.99, None, 0.95]],
        min_balancedness=[0.98, 0.74, None, 0.86],
        num_shards=2)
    events = [
        EventView(kind="rebalance", reason="min balancedness 0.74 < 0.90 for 30s; planned 0.97", time=T0 - 15,
                  epoch_before=6, epoch_after=7, balancedness_before=0.74, balancedness_after=0.97,
                  duration_s=1.8, slots_moved=3, bytes_loaded=3 << 20, measured_before=0.75, measured_after=0.86),
        EventView(kind="scale_up_failed", reason="shard 2 did not start: " + "x" * 300, time=T0 - 100,
                  epoch_before=5, epoch_after=None),
        EventView(kind="skip", reason="gain below min_gain", time=T0 - 200),
    ]
    serving = ServingView(
        replicas=[ReplicaHealth(replica="attn-0", running=3, waiting=1, kv_cache_usage=0.42, num_blocks=512,
                                placement_epoch=7, tokens_per_s=180.5, ttft_p50_s=0.045, ttft_p99_s=0.21,
                                itl_p50_s=0.012, itl_p99_s=0.034, requests_finished=40, requests_failed=0,
                                age_s=1.2),
                  ReplicaHealth(replica="attn-1", running=2, waiting=0, kv_cache_usage=0.93, num_blocks=512,
                                placement_epoch=7, tokens_per_s=150.0, ttft_p50_s=None, ttft_p99_s=None,
                                itl_p50_s=0.011, itl_p99_s=0.04, requests_finished=12, requests_failed=2,
                                age_s=2.0)],
        shards=[ShardHealth(shard_id=0, healthy=True, address="10.0.0.1:7000", slots=6, weight_bytes=48 << 20,
                            rss_bytes=300 << 20, tokens=123456),
                ShardHealth(shard_id=1, healthy=False, address="10.0.0.2:7000", slots=6, weight_bytes=48 << 20,
                            rss_bytes=0, tokens=99, error="connection reset")],
        running=5, waiting=1, tokens_per_s=330.5, ttft_p50_s=0.045, ttft_p99_s=0.21, itl_p50_s=0.012,
        itl_p99_s=0.04)
    economics = Economics(family="mixtral", num_layers=2, num_moe_layers=2, num_experts=4, top_k=2,
                          total_params=1_200_000_000, active_params=700_000_000,
                          routed_expert_params=1_000_000_000, dense_equivalent_params=9.5e8, bytes_per_param=2)
    return DashboardState(time=T0, model="demo-mixtral", redis_ok=True, redis_error=None, placement=placement,
                          heatmap=heatmap, shard_series=series, events=events, serving=serving,
                          economics=economics, lookback_s=300.0, notes=[])


def empty_state() -> DashboardState:
    return DashboardState(time=T0, model="demo", redis_ok=False, redis_error="Connection refused",
                          placement=None, heatmap=None, shard_series=None, events=[],
                          serving=ServingView(replicas=[], shards=[], running=0, waiting=0, tokens_per_s=0.0,
                                              ttft_p50_s=None, ttft_p99_s=None, itl_p50_s=None, itl_p99_s=None),
                          economics=None, lookback_s=60.0, notes=["no Redis configured"])


def to_text(state: DashboardState, width: int = 160) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(render(state, width))
    return console.export_text()


# --------------------------------------------------------------------------- state_from_dict


def test_round_trip_through_json():
    s = make_state()
    assert state_from_dict(asdict(s)) == s
    assert state_from_dict(json.loads(json.dumps(asdict(s)))) == s
    e = empty_state()
    assert state_from_dict(json.loads(json.dumps(asdict(e)))) == e


def test_defaults_may_be_omitted():
    d = asdict(make_state())
    del d["notes"]
    for ev in d["events"]:
        del ev["measured_after"]
    s = state_from_dict(d)
    assert s.notes == [] and all(ev.measured_after is None for ev in s.events)


@pytest.mark.parametrize("path, name", [
    (("model",), "state.model"),
    (("serving", "replicas", 1, "running"), "state.serving.replicas[1].running"),
    (("heatmap", "rate"), "state.heatmap.rate"),
    (("events", 0, "kind"), "state.events[0].kind"),
    (("shard_series", "min_balancedness"), "state.shard_series.min_balancedness"),
])
def test_missing_field_is_named(path, name):
    d = asdict(make_state())
    parent = d
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        state_from_dict(d)


def test_wrong_shapes_are_value_errors():
    with pytest.raises(ValueError, match="expected an object"):
        state_from_dict([1, 2])
    d = asdict(make_state())
    d["serving"] = "busy"
    with pytest.raises(ValueError, match="state.serving"):
        state_from_dict(d)
    d = asdict(make_state())
    d["events"] = {"kind": "rebalance"}
    with pytest.raises(ValueError, match="state.events"):
        state_from_dict(d)


# --------------------------------------------------------------------------- render


def _heatmap_rows(text: str) -> dict[str, list[str]]:
    """``{"L0": [cell, ...]}`` from the heatmap panel (the first table whose header names experts)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if " e0" in line and " e3" in line)
    rows = {}
    for line in lines[start + 1:]:
        inner = line.strip("│ ")
        if not inner or set(inner) <= set("─━ "):
            continue
        label, *cells = inner.split()
        if not label.startswith("L"):
            break
        rows[label] = cells
    return rows


def test_render_heatmap_marks_hot_and_cold():
    text = to_text(make_state())
    rows = _heatmap_rows(text)
    assert set(rows) == {"L0", "L1"}
    assert rows["L0"] == ["120", "95", "812" + HOT_MARK, "101"]
    assert rows["L1"] == ["300", "250", "276", COLD_MARK]
    assert text.count(HOT_MARK) == 2  # the cell and the legend
    assert "hot (≥2× layer mean)" in text


def test_render_heatmap_marks_collapsed_and_dead_and_the_stalled_balancer():
    from moeyard.cluster.dashboard.state import BalancerView

    state = make_state()
    state.heatmap.collapsed, state.heatmap.dead = [[0, 3]], [[1, 3]]
    state.heatmap.collapse_fraction, state.heatmap.collapse_windows = 0.1, 6
    state.balancer = BalancerView(seconds_since_rebalance=None, seconds_since_turn=400.0, stalled=True)
    state.warnings = ["the autoscaler has not finished a turn for 400 s"]
    assert state_from_dict(json.loads(json.dumps(asdict(state)))) == state
    text = to_text(state)
    rows = _heatmap_rows(text)
    assert rows["L0"][3] == COLLAPSED_MARK and rows["L1"][3] == DEAD_MARK   # dead before cold
    assert "collapsed (<0.1× layer mean, 6 windows: 1)" in text and "dead (1)" in text
    assert "last rebalance none stored · autoscaler turn 400s ago" in text
    assert "warning: the autoscaler has not finished a turn for 400 s" in text


def test_render_shards_balancedness_placement_serving_events():
    s = make_state()
    text = to_text(s)
    # header
    assert "demo-mixtral" in text and "epoch 7" in text and "Redis ok" in text
    assert "min balancedness now 0.86" in text
    # per-layer shard rates of the newest window, balancedness now, sparkline
    l0 = next(line for line in text.splitlines() if line.strip("│ ").startswith("L0") and "654" in line)
    assert "476" in l0 and "0.86" in l0 and sparkline([0.98, 0.74, None, 0.86]) in l0
    l1 = next(line for line in text.splitlines() if line.strip("│ ").startswith("L1") and "434" in line)
    assert "391" in l1 and "0.95" in l1
    assert sparkline([0.98, 0.74, None, 0.86]) == "█▆ ▇"
    # placement: replicated experts starred, per shard
    p0 = next(line for line in text.splitlines() if line.strip("│ ").startswith("L0") and "2*" in line)
    assert "0* 2* 1" in p0 and "2* 3 0*" in p0
    # serving and shards
    assert "running 5" in text and "waiting 1" in text and "330 tok/s" in text
    assert "TTFT p50/p99 45/210 ms" in text and "ITL p50/p99 12/40 ms" in text
    assert "42%" in text and "93%" in text
    assert "48.0" in text and "connection reset" in text
    # events, newest first, reasons truncated
    assert "rebalance" in text and "scale_up_failed" in text and "skip" in text
    assert "6→7" in text and "0.74→0.97" in text and "0.75→0.86" in text
    assert "x" * 200 not in text and "…" in text
    assert text.index("rebalance") < text.index("scale_up_failed") < text.index("gain below")


def test_render_only_last_eight_events():
    s = make_state()
    s.events = [EventView(kind=f"kind{i}", reason="r", time=T0 - i) for i in range(11)]
    text = to_text(s)
    assert "kind7" in text and "kind8" not in text and "3 older not shown" in text


def test_render_empty_views_show_notes():
    text = to_text(empty_state())
    assert text.count("no Redis configured") >= 3
    assert "Redis err" in text and "Connection refused" in text
    assert "no replica has published telemetry" in text


def test_render_wide_heatmap_splits_to_width():
    s = make_state()
    num_experts = 40
    s.heatmap.rate = [[float(e) for e in range(num_experts)] for _ in range(2)]
    s.heatmap.hot, s.heatmap.cold = [[0, 39]], [[1, 0]]
    text = to_text(s, width=100)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert " e0" in text and " e39" in text and "39" + HOT_MARK in text


# --------------------------------------------------------------------------- HTTP + CLI


class _Handler(BaseHTTPRequestHandler):
    state_json: bytes = b""
    seen: list  # set per server by the fixture
    token = TOKEN

    def do_GET(self):
        url = urlparse(self.path)
        type(self).seen.append((url.path, parse_qs(url.query)))
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            body, code = b'{"error": "unauthorized"}', 401
        elif url.path != "/api/state":
            body, code = b'{"error": "not found"}', 404
        else:
            body, code = self.state_json, 200
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def dashboard():
    handler = type("Handler", (_Handler,), {"state_json": json.dumps(asdict(make_state())).encode(), "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_run_top_once(dashboard, capsys):
    url, handler = dashboard
    console = Console(record=True, width=160, color_system=None)
    assert run_top(url, TOKEN, 120, 2, once=True, console=console) == 0
    text = console.export_text()
    assert "demo-mixtral" in text and "812" + HOT_MARK in text and "scale_up_failed" in text
    assert handler.seen == [("/api/state", {"lookback": ["120"]})]


def test_run_top_live_shows_errors_in_frame_until_ctrl_c(dashboard, monkeypatch):
    from moeyard.cluster.cli import top

    url, handler = dashboard
    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        if len(sleeps) == 1:
            handler.token = "rotated"  # the next fetch is refused
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(top.time, "sleep", fake_sleep)
    console = Console(record=True, width=160, color_system=None)
    assert run_top(url, TOKEN, 60, 0.5, once=False, console=console) == 0
    assert sleeps == [0.5, 0.5] and len(handler.seen) == 2
    text = console.export_text()
    # the last frame: the error, and the last good state below it
    assert "error: dashboard refused the token (401)" in text
    assert "812" + HOT_MARK in text


def test_run_top_wrong_token(dashboard, capsys):
    url, _ = dashboard
    assert run_top(url, "wrong", 120, 2, once=True) == 1
    err = capsys.readouterr().err
    assert "error: dashboard refused the token (401)" in err


def test_run_top_unreachable(capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    assert run_top(url, TOKEN, 60, 2, once=True) == 1
    assert f"error: dashboard at {url} is not reachable" in capsys.readouterr().err


def test_cli_top_once(dashboard, capsys, monkeypatch):
    from moeyard.cluster.cli.main import main

    url, handler = dashboard
    monkeypatch.setenv("COLUMNS", "160")
    assert main(["top", "--url", url, "--token", TOKEN, "--once", "--lookback", "90"]) == 0
    out = capsys.readouterr().out
    assert "demo-mixtral" in out and "rebalance" in out
    assert handler.seen[-1] == ("/api/state", {"lookback": ["90"]})
    assert main(["top", "--url", url, "--token", "nope", "--once"]) == 1
    assert "refused the token (401)" in capsys.readouterr().err


def test_cli_top_token_from_env_and_url_from_state(dashboard, capsys, monkeypatch):
    import moeyard.cluster.cli.local_cluster as lc
    from moeyard.cluster.cli.main import main

    url, handler = dashboard
    monkeypatch.setenv("MOEYARD_API_TOKEN", TOKEN)
    monkeypatch.setattr(lc, "load_state", lambda: lc.ClusterState(
        ray_address="127.0.0.1:6379", started_ray=True, api="127.0.0.1:50051", namespace="moeyard",
        model="demo", pid=1, dashboard=url))
    assert main(["top", "--once"]) == 0
    assert "demo-mixtral" in capsys.readouterr().out
    assert handler.seen[-1] == ("/api/state", {"lookback": ["300"]})


def test_cli_top_without_url(capsys, monkeypatch):
    import moeyard.cluster.cli.local_cluster as lc
    from moeyard.cluster.cli.main import main

    monkeypatch.setattr(lc, "load_state", lambda: None)
    assert main(["top", "--once"]) == 1
    assert "error: no dashboard URL: pass --url or start a cluster with `moeyard up`" in capsys.readouterr().err
