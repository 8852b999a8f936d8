"""The dashboard end to end: a real cluster on Ray with skewed traffic, seen through headless Chromium.

A skewed Mixtral (Zipf(1.2) router bias) is served by 2 shards x 5 slots and one attention
replica, with Redis. While requests stream, the page (Debian's ``chromium`` driven by
Playwright) must show: a heatmap cell per (MoE layer, expert) with each layer's most
loaded expert (by the load windows in Redis) marked hot, the placement that Redis holds
(expert per slot, shard per slot, copies marked), and the autoscaler timeline. A rebalance
is then triggered: the timeline gains the event and the placement panel the new epoch and
layout. Screenshots go to ``$MOEYARD_TEST_ARTIFACTS`` (``.ci/run`` sets it) or the test's tmp dir.
Also checked on the live cluster: 401 without the token, ``/metrics`` parses and carries
the serving and expert series, and ``moeyard top --once`` draws the same view.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import shutil
import threading
import time
import types
from pathlib import Path

import pytest
import torch

from moeyard.client import AsyncMoeyardClient
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.control.load_store import read_load
from moeyard.cluster.control.placement_store import read_events, read_placement
from moeyard.cluster.dashboard import views
from moeyard.cluster.infra.redis_server import LocalRedis
from moeyard.cluster.serving.app import APP_NAME, build_app
from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions

pytestmark = pytest.mark.timeout(600)
TOKEN = "dashboard-e2e-token-0123456789"
PREFIX = "dash-e2e"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLLAPSE_FRACTION, COLLAPSE_WINDOWS = 0.1, 3
"""The skewed model's coldest experts (layer 1's expert 7 gets ~2% of its layer's mean) starve under it."""


def _browser_or_skip():
    """Playwright's sync API and a Chromium binary; CI (MOEYARD_REQUIRE_BROWSER=1) fails instead of skipping."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or CHROMIUM is None:
        why = "needs the playwright package and Debian's chromium (apt-get install -y chromium)"
        if os.environ.get("MOEYARD_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("MOEYARD_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def redis_info(tmp_path_factory):
    info = LocalRedis.start(tmp_path_factory.mktemp("redis"))
    yield info
    LocalRedis.stop(info)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_info, ray_serve):
    from ray import serve

    model = tmp_path_factory.mktemp("skewed")
    make_model(MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=96, experts=8, top_k=2,
                                heads=4, kv_heads=2, vocab=512, dtype="float32", seed=3, skew=1.2), model)
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    cfg = ClusterConfig(
        model=str(model), dtype="float32", namespace="dash-e2e", expert_shards=2, redundant_slots_per_shard=1,
        attention_replicas=1, torch_threads=1, api_token_file=str(token_file),
        engine=EngineSettings(kv_cache_mib=16),
        redis=RedisSettings(url=redis_info.url, password_file=redis_info.password_file, key_prefix=PREFIX,
                            window_s=1.0, flush_interval_s=0.2, socket_timeout_s=0.3),
        autoscaler=AutoscalerSettings(enabled=False, lookback_s=10, half_life_windows=50, min_gain=0.0,
                                      drain_timeout_s=10),
        dashboard=DashboardSettings(lookback_s=120, heatmap_span_s=5, telemetry_interval_s=0.5,
                                    collapse_fraction=COLLAPSE_FRACTION, collapse_windows=COLLAPSE_WINDOWS))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    ingress = serve.get_app_handle(APP_NAME)
    api = ingress.address.remote().result(timeout_s=120)
    url = ingress.dashboard_address.remote().result(timeout_s=60)
    traffic = Traffic(api)
    traffic.start()
    yield {"api": api, "url": url, "traffic": traffic}
    traffic.stop()
    serve.delete(APP_NAME)


class Traffic:
    """Greedy requests in a loop on a thread, until stopped; counts completions and errors."""

    def __init__(self, api: str):
        self.api = api
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        g = torch.Generator().manual_seed(5)
        client = AsyncMoeyardClient(self.api, token=TOKEN, timeout=120)
        try:
            while not self._stop.is_set():
                prompts = [torch.randint(3, 256, (12,), generator=g).tolist() for _ in range(6)]
                try:
                    await asyncio.gather(*[client.generate_all(p, max_new_tokens=16, ignore_eos=True)
                                           for p in prompts])
                    self.done += len(prompts)
                except Exception as e:  # noqa: BLE001 - recorded and asserted on
                    self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            await client.close()

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(120)


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _hottest(client, span_s: float = 6.0) -> list[int]:
    """Per MoE layer, the expert with the most tokens in the recent windows (from Redis directly)."""
    w = read_load(client, PREFIX, since_s=span_s)
    return w.expert_counts.sum(dim=0).argmax(dim=1).tolist()


def _dom_placement(page) -> dict[tuple[int, int], tuple[int, int]]:
    """(layer, slot) -> (shard, expert) as the placement panel shows it."""
    boxes = page.eval_on_selector_all(
        "#panel-placement .slot",
        "els => els.map(e => [e.dataset.layer, e.dataset.slot, e.dataset.shard, e.dataset.expert])")
    return {(int(l), int(s)): (int(sh), int(e)) for l, s, sh, e in boxes}


def _redis_placement(client) -> tuple[int, dict[tuple[int, int], tuple[int, int]]]:
    p = read_placement(client, PREFIX).placement
    spp = p.slots_per_shard
    return p.epoch, {(l, s): (s // spp, int(p.phy2log[l, s])) for l in range(p.num_layers)
                     for s in range(p.num_slots)}


def test_dashboard_shows_load_placement_and_timeline(cluster, redis_info, artifacts):
    sync_playwright = _browser_or_skip()
    client = redis_info.client()
    url = cluster["url"]
    assert url.startswith("http://127.0.0.1:")
    _wait(lambda: read_load(client, PREFIX, since_s=8).num_windows >= 4, 120, "load windows in Redis")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            resp = page.goto(url)
            assert resp.status == 401                          # no token: 401, not a redirect
            resp = page.goto(url + f"?token={TOKEN}")
            assert resp.status == 200
            page.wait_for_selector("[data-updated]", timeout=30_000)
            _wait(lambda: "token=" not in page.url, 10, "the token gone from the address bar")

            # heatmap: one cell per (layer, expert); each layer's hottest expert (Redis) is marked hot
            cells = page.locator("#panel-heatmap rect.cell")
            _wait(lambda: cells.count() == 2 * 8, 30, "16 heatmap cells")

            def hot_matches():
                hottest = _hottest(client)
                states = page.eval_on_selector_all(
                    "#panel-heatmap rect.cell",
                    "els => els.map(e => [e.dataset.layer, e.dataset.expert, e.dataset.state])")
                hot = {(int(l), int(e)) for l, e, s in states if s == "hot"}
                return all((layer, e) in hot for layer, e in enumerate(hottest))
            _wait(hot_matches, 30, "the hottest expert of every layer marked hot")

            # starved experts: the cells flagged collapsed / dead are the ones the load windows in Redis say
            def starved_matches():
                w = read_load(client, PREFIX, since_s=60)
                whole = views.whole_windows(w, time.time(), w.window_s)
                collapsed, dead = views.expert_collapse(w.expert_counts[whole], COLLAPSE_FRACTION, COLLAPSE_WINDOWS)
                want = {**{(l, e): "collapsed" for l, e in collapsed.nonzero().tolist()},
                        **{(l, e): "dead" for l, e in dead.nonzero().tolist()}}
                states = page.eval_on_selector_all(
                    "#panel-heatmap rect.cell",
                    "els => els.map(e => [e.dataset.layer, e.dataset.expert, e.dataset.state])")
                got = {(int(l), int(e)): st for l, e, st in states if st in ("collapsed", "dead")}
                return bool(want) and got == want
            _wait(starved_matches, 30, "the starved experts flagged as Redis's windows say")

            # placement: what Redis holds, slot by slot, with the epoch in the heading
            epoch0, expected = _redis_placement(client)
            assert _dom_placement(page) == expected
            assert f"epoch {epoch0}" in page.inner_text("#panel-placement")
            replicated = page.locator("#panel-placement .slot[data-replicated='1']").count()
            assert replicated >= 2                              # the redundant slots hold copies
            page.screenshot(path=str(artifacts / "dashboard-before-rebalance.png"), full_page=True)

            # a rebalance: the timeline gains it, the placement panel shows the new layout
            from ray import serve

            rows_before = page.locator("#panel-timeline tr.event[data-kind='rebalance']").count()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # Playwright's sync API owns this thread's loop
                result = pool.submit(lambda: serve.get_deployment_handle("Autoscaler", APP_NAME)
                                     .rebalance.remote().result(timeout_s=120)).result(180)
            assert result.acted, result
            epoch1, expected1 = _redis_placement(client)
            assert epoch1 > epoch0
            _wait(lambda: page.locator("#panel-timeline tr.event[data-kind='rebalance']").count() > rows_before,
                  30, "the rebalance in the timeline")
            _wait(lambda: f"epoch {epoch1}" in page.inner_text("#panel-placement"), 30, "the new epoch")
            assert _dom_placement(page) == expected1
            event = read_events(client, PREFIX, 10)
            assert any(e["kind"] == "rebalance" and e["epoch_after"] == epoch1 for e in event)
            row = page.locator("#panel-timeline tr.event[data-kind='rebalance']").first.inner_text()
            assert str(epoch1) in row

            # serving health shows the replica and both shards
            _wait(lambda: page.locator("#panel-serving tr.replica").count() == 1, 30, "the replica's row")
            assert page.locator("#panel-serving tr.shard").count() == 2
            page.screenshot(path=str(artifacts / "dashboard-after-rebalance.png"), full_page=True)
        finally:
            browser.close()
    assert (artifacts / "dashboard-after-rebalance.png").stat().st_size > 10_000
    assert cluster["traffic"].done > 0 and not cluster["traffic"].errors


def test_live_metrics_auth_and_top(cluster, redis_info):
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from rich.console import Console

    from moeyard.cluster.cli.top import run_top

    url = cluster["url"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "api/state", timeout=10)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url + "api/state?lookback=oops",
                                                      headers={"Authorization": f"Bearer {TOKEN}"}), timeout=10)
    assert e.value.code == 400

    def families():
        text = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}
    fams = _wait(lambda: (f := families()) and "moeyard:time_to_first_token_seconds" in f
                 and "moeyard:balancedness" in f and f, 60, "serving and balancedness series")
    for name in ("moeyard:num_requests_running", "moeyard:generation_tokens", "moeyard:expert_tokens",
                 "moeyard:kv_cache_usage_perc", "moeyard:shard_up", "moeyard:redis_up",
                 "moeyard:autoscaler_seconds_since_turn"):
        assert name in fams, name
    # the skewed model's starved experts are counted per layer
    starved = _wait(lambda: (f := families()) and sum(s.value for s in f["moeyard:collapsed_experts"].samples) > 0
                    and f["moeyard:collapsed_experts"], 60, "collapsed experts on /metrics")
    assert {s.labels["layer"] for s in starved.samples} == {"0", "1"}
    assert fams["moeyard:autoscaler_seconds_since_turn"].samples[0].value < 30   # the loop is alive
    gen = [s.value for s in fams["moeyard:generation_tokens"].samples if s.name.endswith("_total")]
    assert gen and gen[0] > 0
    layers = {s.labels["layer"] for s in fams["moeyard:balancedness"].samples}
    assert layers == {"0", "1"}
    # bytes to the shards: each token once per shard (top-2 here), so fewer hidden bytes than one per
    # (token, expert) row, plus a 4-byte index per row; and per model step

    def wire(f):
        vals = {}
        for name in ("moeyard:expert_wire_bytes", "moeyard:expert_wire_bytes_per_assignment",
                     "moeyard:engine_steps", "moeyard:expert_wire_bytes_per_step"):
            for smp in f.get(name, types.SimpleNamespace(samples=[])).samples:
                if smp.name.endswith("_created"):
                    continue
                key = smp.name + ":" + smp.labels.get("part", "")
                vals[key] = vals.get(key, 0.0) + smp.value
        return vals
    w = _wait(lambda: (v := wire(families())) and v.get("moeyard:expert_wire_bytes_total:hidden", 0) > 0 and v,
              60, "wire byte counters")
    hidden, index = w["moeyard:expert_wire_bytes_total:hidden"], w["moeyard:expert_wire_bytes_total:index"]
    per_assignment = w["moeyard:expert_wire_bytes_per_assignment_total:"]
    assert 0 < hidden < per_assignment and index > 0
    assert w["moeyard:engine_steps_total:"] > 0 and w["moeyard:expert_wire_bytes_per_step:"] > 0
    # every series the Grafana dashboard is built on is there, with the labels it expects
    from tests.deploy.test_grafana import EXPECTED_METRICS, OPTIONAL_METRICS

    seen = {}
    for f in fams.values():
        for s in f.samples:
            seen.setdefault(s.name, set(s.labels) - {"le"})
    for name, (kind, labels) in EXPECTED_METRICS.items():
        if name in OPTIONAL_METRICS:
            continue
        sample = name + ("_count" if kind == "histogram" else "")
        assert sample in seen, f"{sample} missing from the live /metrics"
        assert seen[sample] == set(labels), (sample, seen[sample], labels)

    out = io.StringIO()
    console = Console(file=out, width=180, color_system=None)
    assert run_top(url, TOKEN, 60, 1, once=True, console=console) == 0
    text = out.getvalue()
    assert "▲" in text and "epoch" in text
