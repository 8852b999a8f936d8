"""The dashboard server on real sockets over a real redis-server: auth, queries, JSON, /metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeyard.cluster.control.autoscaler_metrics import AutoscalerMetrics
from moeyard.cluster.control.load_store import LoadFlusher
from moeyard.cluster.control.placement_store import Event, push_event, write_placement
from moeyard.cluster.dashboard.collect import DashboardSource
from moeyard.cluster.dashboard.server import COOKIE, DashboardServer, session_value
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.infra.telemetry import publish
from moeyard.cluster.serving.replica_metrics import ReplicaMetrics, RequestTimer
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.router_service.load_recorder import LoadRecorder
from moeyard.router_service.placement import Placement

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-dashboard-token"
# 2 MoE layers x 4 experts on 2 shards x 3 slots; experts 0 and 2 of layer 0 have two copies
PHY2LOG = [[0, 1, 2, 0, 2, 3], [0, 1, 2, 3, 0, 1]]
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def prefix(request):
    return "dash" + str(abs(hash(request.node.name)) % 10**8)


def fill_redis(info, prefix: str, clock: Clock) -> None:
    """5 whole 1-s windows: layer 0 sends 3/4 of its tokens to expert 1 (one copy, shard 0)
    and none to expert 3 (cold); layer 1 is even. One rebalance event; one replica's telemetry."""
    s = info.settings(key_prefix=prefix, window_s=1.0)
    client = connect(s)
    placement = Placement(torch.tensor(PHY2LOG), 2, 7)
    write_placement(client, prefix, placement, "fp")
    rec = LoadRecorder(2, 4, 6)
    metrics = ReplicaMetrics(per_expert=True)
    fl = LoadFlusher(rec, lambda: client, s, "rep-a", epoch_fn=lambda: (7, 6), clock=clock,
                     on_snapshot=lambda snap: metrics.expert_load(snap, 2))
    for w in range(5):
        clock.t = T0 + w + 0.5
        ids0 = torch.tensor([[1, 0]] * 30 + [[1, 2]] * 30)            # [T, A]: expert 1 gets 60 of 120
        rec.record(0, ids0, torch.tensor([[1, 0]] * 30 + [[1, 4]] * 30))     # shard 0: 90, shard 1: 30
        ids1 = torch.tensor([[0, 1], [2, 3]] * 30)
        rec.record(1, ids1, torch.tensor([[0, 5], [2, 3]] * 30))              # 60 and 60
        assert fl.flush_now()
    clock.t = T0 + 5.2
    push_event(client, prefix, Event("rebalance", "min balancedness 0.50 < 0.90 for 30 s", time=T0 + 2.2,
                                     epoch_before=6, epoch_after=7, balancedness_before=0.5,
                                     balancedness_after=0.97, duration_s=0.4, slots_moved=3, bytes_loaded=3 << 20))
    timer = RequestTimer(start=time.monotonic() - 0.05)
    metrics.tokens(timer, 1)
    metrics.tokens(timer, 1)
    metrics.finished(timer, "length", 5)
    metrics.engine_state(running=3, waiting=1, kv_usage=0.25, epoch=7, flushes_failed=2, tokens_dropped=0)
    publish(client, prefix, "replica", "rep-a", metrics.registry,
            {"running": 3, "waiting": 1, "kv_cache_usage": 0.25, "num_blocks": 64, "placement_epoch": 7,
             **metrics.summary()})
    auto = AutoscalerMetrics()
    auto.observe(Event("rebalance", "x", duration_s=0.4, slots_moved=3, bytes_loaded=3 << 20))
    publish(client, prefix, "autoscaler", "0", auto.registry, {})


SHARDS = [
    {"shard_id": 0, "healthy": True, "address": "127.0.0.1:1", "slots": {0: [(0, 0), (1, 1), (2, 2)]},
     "weight_bytes": 3 << 20, "rss_bytes": 100 << 20, "tokens": 500},
    {"shard_id": 1, "healthy": False, "error": "ActorDiedError: shard 1 died"},
]


class Running:
    """A DashboardServer on its own event loop thread."""

    def __init__(self, server: DashboardServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.url = self.loop.run_until_complete(server.start("127.0.0.1", 0))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert started.wait(10)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def dashboard(local_redis, prefix):
    clock = Clock(T0)
    fill_redis(local_redis, prefix, clock)
    s = DashboardSettings(heatmap_span_s=3.0, hot_factor=2.0, lookback_s=60)
    source = DashboardSource(s, connect(local_redis.settings(key_prefix=prefix)), prefix, 1.0,
                             lambda: SHARDS, "tiny-mixtral", None, clock=clock)
    running = Running(DashboardServer(source, TOKEN))
    yield running
    running.close()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_every_path_but_metrics_needs_the_token(dashboard):
    u = dashboard.url
    for path in ("", "api/state", "api/panels", "static/dashboard.js", "nope"):
        code, headers, body = get(u + path)
        assert code == 401, path
        assert "Location" not in headers
        assert TOKEN.encode() not in body
    code, _, body = get(u + "api/state", {"Authorization": "Bearer wrong"})
    assert code == 401 and b"not valid" in body
    code, _, body = get(u, {"Accept": "text/html"})
    assert code == 401 and b"<form" in body            # a browser gets a form to enter the token
    assert get(u + "metrics")[0] == 200
    assert get(u + "api/state", AUTH)[0] == 200


def test_query_token_sets_a_session_cookie_that_is_not_the_token(dashboard):
    code, headers, body = get(dashboard.url + f"?token={TOKEN}")
    assert code == 200 and b"<html" in body.lower()
    cookie = headers["Set-Cookie"]
    assert f"{COOKIE}={session_value(TOKEN)}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    code, _, body = get(dashboard.url + "api/state", {"Cookie": f"{COOKIE}={session_value(TOKEN)}"})
    assert code == 200 and json.loads(body)["model"] == "tiny-mixtral"
    assert get(dashboard.url + "api/state", {"Cookie": f"{COOKIE}={TOKEN}"})[0] == 401


@pytest.mark.parametrize("query", ["lookback=abc", "lookback=-5", "lookback=nan", "lookback=inf", "lookback=1e9",
                                   "lookback=10&lookback=20", "window=3", "lookback="])
def test_malformed_query_is_400_and_the_server_keeps_serving(dashboard, query):
    code, _, body = get(dashboard.url + "api/state?" + query, AUTH)
    assert code == 400, body
    msg = json.loads(body)["message"]
    assert "lookback" in msg or "window" in msg
    assert get(dashboard.url + "api/state?lookback=30", AUTH)[0] == 200
    assert get(dashboard.url + "metrics?x=1")[0] == 400


def test_state_shows_hot_cold_placement_series_events_and_serving(dashboard):
    code, _, body = get(dashboard.url + "api/state?lookback=60", AUTH)
    st = json.loads(body)
    hm = st["heatmap"]
    # layer 0: expert 1 gets 60 of 120 assignments per window (2x the mean of 30): hot; expert 3 none: cold
    assert [0, 1] in hm["hot"] and [0, 3] in hm["cold"]
    assert not any(layer == 1 for layer, _ in hm["hot"] + hm["cold"])
    assert hm["rate"][0] == pytest.approx([30.0, 60.0, 30.0, 0.0])   # 3 whole windows of 1 s
    p = st["placement"]
    assert p["epoch"] == 7 and p["num_shards"] == 2 and p["slots_per_shard"] == 3
    assert p["copies"][0] == [2, 1, 2, 1]
    ser = st["shard_series"]
    assert len(ser["times"]) == 5 and ser["num_shards"] == 2
    # layer 0 slots: shard 0 computed slots 0 and 1 (30 + 60 per window), shard 1 slot 4 (30)
    assert ser["rate"][0][-1] == pytest.approx([90.0, 30.0])
    assert ser["balancedness"][0][-1] == pytest.approx(60 / 90)
    assert ser["balancedness"][1][-1] == pytest.approx(1.0)
    ev = st["events"][0]
    assert ev["kind"] == "rebalance" and ev["epoch_after"] == 7
    assert ev["measured_before"] == pytest.approx(60 / 90) and ev["measured_after"] == pytest.approx(60 / 90)
    rep = st["serving"]["replicas"][0]
    assert rep["replica"] == "rep-a" and rep["running"] == 3 and rep["kv_cache_usage"] == 0.25
    assert rep["ttft_p50_s"] is not None and rep["requests_finished"] == 1
    shards = st["serving"]["shards"]
    assert shards[0]["slots"] == 3 and shards[0]["healthy"] and not shards[1]["healthy"]
    assert "died" in shards[1]["error"]


def test_metrics_parse_and_carry_the_series(dashboard):
    code, headers, body = get(dashboard.url + "metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("moeyard:num_requests_running", "moeyard:num_requests_waiting", "moeyard:kv_cache_usage_perc",
                 "moeyard:time_to_first_token_seconds", "moeyard:inter_token_latency_seconds",
                 "moeyard:e2e_request_latency_seconds", "moeyard:generation_tokens", "moeyard:prompt_tokens",
                 "moeyard:request_success", "moeyard:expert_tokens", "moeyard:expert_tokens_by_expert",
                 "moeyard:balancedness", "moeyard:min_balancedness", "moeyard:rebalances",
                 "moeyard:rebalance_duration_seconds", "moeyard:slots_moved", "moeyard:migrated_bytes",
                 "moeyard:load_flush_failures", "moeyard:load_tokens_dropped", "moeyard:placement_epoch",
                 "moeyard:shard_up", "moeyard:shard_weight_bytes", "moeyard:redis_up"):
        assert name in fams, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("moeyard:num_requests_running", (("replica", "rep-a"),))] == 3
    assert samples[("moeyard:load_flush_failures_total", (("replica", "rep-a"),))] == 2
    assert samples[("moeyard:generation_tokens_total", (("replica", "rep-a"),))] == 2
    # per layer x shard: layer 0, shard 0 computed 90 per window for 5 windows
    assert samples[("moeyard:expert_tokens_total", (("layer", "0"), ("replica", "rep-a"), ("shard", "0")))] == 450
    assert samples[("moeyard:balancedness", (("layer", "0"),))] == pytest.approx(60 / 90)
    assert samples[("moeyard:min_balancedness", ())] == pytest.approx(60 / 90)
    assert samples[("moeyard:rebalances_total", (("kind", "rebalance"), ("outcome", "ok")))] == 1
    assert samples[("moeyard:shard_up", (("shard", "1"),))] == 0
    assert samples[("moeyard:redis_up", ())] == 1


def test_redis_down_is_reported_not_raised(local_redis, prefix):
    s = DashboardSettings()
    dead = connect(RedisSettings(url="redis://127.0.0.1:1/0", key_prefix=prefix, socket_timeout_s=0.2))
    running = Running(DashboardServer(DashboardSource(s, dead, prefix, 5.0, None, "m", None), TOKEN))
    try:
        code, _, body = get(running.url + "api/state", AUTH)
        st = json.loads(body)
        assert code == 200 and not st["redis_ok"] and "Redis unreachable" in st["notes"][0]
        code, _, body = get(running.url + "metrics")
        assert code == 200 and "moeyard:redis_up 0.0" in body.decode()
    finally:
        running.close()
