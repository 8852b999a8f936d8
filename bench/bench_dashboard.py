"""Dashboard cost at DeepSeek-V3 scale: Redis read, views, panels, JSON bodies and the /metrics scrape.

    .venv/bin/python -m bench.bench_dashboard [--also-small] [--json]
        [--layers 58 --experts 256 --shards 8 --slots-per-shard 40 --replicas 4 --windows 60 --window-s 5]

Starts its own redis-server (LocalRedis in a temp dir) and, per shape, writes under a fresh key prefix:
the placement (slot ``p < E`` holds expert ``p``, the extra slots copies of random experts); ``--windows``
whole load windows per replica, each ``--tokens`` tokens x top-``--top-k`` experts per MoE layer drawn
with Zipf(1.2) popularity in a random expert order per layer, sent to a random copy (a LoadRecorder and a
LoadFlusher per replica, a fake clock stepping through the windows); 50 autoscaler events; one telemetry
snapshot per replica and one of the autoscaler. ``--also-small`` adds 4 layers x 8 experts (top-2) on 2 x 5 slots.

Measured, median of ``--repeats`` after one warm-up (the setup's objects frozen out of the GC first):

* ``DashboardSource.state(lookback_s=300)`` (what ``/api/state`` and ``/api/panels`` build), split per call
  into ``source.read_redis`` (timed inside the call) and the rest: building the views;
* ``render_panels(state)``, and the ``/api/panels`` and ``/api/state`` JSON bodies: raw and gzip (level 6) sizes;
* ``generate_latest`` of a registry holding ``ClusterCollector(source)`` (the ``/metrics`` scrape), body size
  and sample count, with the replicas' snapshots from ``ReplicaMetrics(per_expert=False)`` and then ``True``.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.common import print_machine, timed
from moeyard.cluster.control.autoscaler_metrics import AutoscalerMetrics
from moeyard.cluster.control.load_store import LoadFlusher
from moeyard.cluster.control.placement_store import Event, push_event, write_placement
from moeyard.cluster.dashboard.collect import DashboardSource
from moeyard.cluster.dashboard.prom import ClusterCollector
from moeyard.cluster.dashboard.render import render_panels
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.infra.redis_server import LocalRedis
from moeyard.cluster.infra.telemetry import publish
from moeyard.cluster.serving.replica_metrics import ReplicaMetrics, RequestTimer
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.model.economics import Economics
from moeyard.router_service.load_recorder import LoadRecorder
from moeyard.router_service.placement import Placement

LOOKBACK_S = 300.0
TTL_S = 3600  # telemetry outlives the bench (the default 15 s would expire between phases)
EVENT_KINDS = ["rebalance", "skip", "skip", "scale_up", "rebalance_failed", "reconcile", "skip", "scale_down",
               "republish", "rebalance"]


class TimedSource(DashboardSource):
    """Times each :meth:`read_redis` call, so that a ``state()`` call splits into reading and building views."""

    last_read_s = 0.0

    def read_redis(self, lookback_s: float):
        t = time.perf_counter()
        snap = super().read_redis(lookback_s)
        self.last_read_s = time.perf_counter() - t
        return snap


def make_placement(L: int, E: int, N: int, S: int, rng: np.random.Generator) -> Placement:
    """Slot ``p < E`` holds expert ``p``; the ``N * S - E`` extra slots hold copies of random experts."""
    extra = rng.integers(0, E, size=(L, N * S - E))
    phy2log = np.concatenate([np.tile(np.arange(E), (L, 1)), extra], axis=1)
    return Placement(torch.tensor(phy2log, dtype=torch.int64), N, epoch=1)


def fill(client, info, prefix: str, a, rng: np.random.Generator) -> tuple[DashboardSource, list, float]:
    """Write one shape's data; returns the source, per replica its (per_expert off, on) metrics, and 'now'."""
    L, E, N, S, R, W, ws = a.layers, a.experts, a.shards, a.slots_per_shard, a.replicas, a.windows, a.window_s
    placement = make_placement(L, E, N, S, rng)
    write_placement(client, prefix, placement, "bench")
    P = N * S
    base = 1.0 / np.arange(1, E + 1) ** 1.2
    probs = torch.tensor(np.stack([rng.permutation(base / base.sum()) for _ in range(L)]))      # [L, E]
    log2phy, logcnt = placement.log2phy, placement.logcnt                                      # [L, E, R'], [L, E]
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    t_end = time.time()
    t0 = (int(t_end // ws) - W) * ws                    # W whole windows ending at or before now
    settings = info.settings(key_prefix=prefix, window_s=ws)
    tick = [t0]                                         # the flushers' fake clock
    metrics = []
    layer_idx = torch.arange(L).unsqueeze(1)
    for r in range(R):
        rec = LoadRecorder(L, E, P)
        pair = (ReplicaMetrics(per_expert=False), ReplicaMetrics(per_expert=True))

        def feed(snap, pair=pair):
            for m in pair:
                m.expert_load(snap, N)
        fl = LoadFlusher(rec, lambda: client, settings, f"rep-{r}", epoch_fn=lambda: (1, P), clock=lambda: tick[0],
                         on_snapshot=feed)
        for w in range(W):
            tick[0] = t0 + (w + 0.5) * ws
            ids = torch.multinomial(probs, a.tokens * a.top_k, replacement=True, generator=gen)   # [L, T*A]
            pick = (torch.rand(ids.shape, generator=gen) * logcnt[layer_idx, ids]).long()
            slots = log2phy[layer_idx, ids, pick]
            for layer in range(L):
                rec.record(layer, ids[layer].view(-1, a.top_k), slots[layer].view(-1, a.top_k))
            assert fl.flush_now(), fl.stats().last_error
        for m in pair:
            for i in range(20):                         # some requests, for the histograms and the summary
                timer = RequestTimer(start=100.0 + i)
                for k in range(10):
                    m.tokens(timer, 1, now=100.0 + i + 0.05 + 0.02 * k)
                m.finished(timer, "length" if i % 5 else "stop", 64, now=100.0 + i + 0.3)
            m.engine_state(running=8 + r, waiting=r, kv_usage=0.3 + 0.1 * r, epoch=1)
        metrics.append(pair)
    now = t0 + W * ws + 0.5
    auto = AutoscalerMetrics()
    for i in range(50):
        kind = EVENT_KINDS[i % len(EVENT_KINDS)]
        moved = kind.removesuffix("_failed") in ("rebalance", "scale_up", "scale_down")
        ev = Event(kind, f"min balancedness {0.6 + 0.005 * i:.3f} < 0.90 for 30 s", time=now - LOOKBACK_S + 6 * i,
                   epoch_before=i, epoch_after=i + 1 if moved else i, balancedness_before=0.6,
                   balancedness_after=0.95 if moved else None, duration_s=2.5 if moved else None,
                   slots_moved=12 if moved else None, bytes_loaded=12 * 44 << 20 if moved else None)
        push_event(client, prefix, ev)
        auto.observe(ev)
    publish(client, prefix, "autoscaler", "0", auto.registry, {}, ttl_s=TTL_S)

    def shard_status() -> list[dict]:
        p2l = placement.phy2log.tolist()
        return [{"shard_id": n, "healthy": n != N - 1, "address": f"10.0.0.{n + 10}:50051",
                 "slots": {layer: [(p, p2l[layer][p]) for p in range(n * S, (n + 1) * S)] for layer in range(L)},
                 "weight_bytes": L * S * (44 << 20), "rss_bytes": L * S * (45 << 20), "tokens": 10**6 * (n + 1),
                 **({"healthy": False, "error": "ActorDiedError: shard died"} if n == N - 1 else {})}
                for n in range(N)]

    per_expert, other = 3 * 7168 * 2048, 17_000_000_000 * L // 58     # DeepSeek-V3-like parameter counts
    total = other + per_expert * L * E
    econ = Economics("deepseek_v3", L + 3, L, E, a.top_k, total, other + a.top_k * per_expert * L,
                     per_expert * L * E, total / (E ** 0.44 / a.top_k ** 0.63), 1)
    source = TimedSource(DashboardSettings(), client, prefix, ws, shard_status, "bench-deepseek", econ,
                         clock=lambda: now)
    return source, metrics, now


def publish_replicas(client, prefix: str, metrics: list, variant: int) -> None:
    for r, pair in enumerate(metrics):
        m = pair[variant]
        publish(client, prefix, "replica", f"rep-{r}", m.registry,
                {"running": 8 + r, "waiting": r, "kv_cache_usage": 0.3 + 0.1 * r, "num_blocks": 4096,
                 "placement_epoch": 1, **m.summary(now=130.0)}, ttl_s=TTL_S)


def measure(client, info, prefix: str, a, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    source, metrics, _ = fill(client, info, prefix, a, rng)
    publish_replicas(client, prefix, metrics, 0)
    gc.collect()
    gc.freeze()  # the setup's objects (L x E labelled counters per replica) are not the dashboard's to scan
    res = {"shape": {k: getattr(a, k) for k in ("layers", "experts", "shards", "slots_per_shard", "replicas",
                                                  "windows", "window_s", "tokens", "top_k")},
           "fill_s": time.perf_counter() - t}
    state = source.state(lookback_s=LOOKBACK_S)  # warm-up
    split = []
    for _ in range(repeats):
        t = time.perf_counter()
        state = source.state(lookback_s=LOOKBACK_S)
        total = time.perf_counter() - t
        split.append((total, source.last_read_s, total - source.last_read_s))
    for k, col in zip(("state_s", "read_redis_s", "views_s"), zip(*split)):
        res[k] = statistics.median(col)
    res["windows_shown"] = len(state.shard_series.times) if state.shard_series else 0
    res["render_s"], _ = timed(lambda: render_panels(state), repeats)
    panels = json.dumps({"time": state.time, "panels": render_panels(state)}).encode()
    res["state_json_s"], _ = timed(lambda: json.dumps(asdict(state), allow_nan=False), repeats)
    body = json.dumps(asdict(state), allow_nan=False).encode()
    res.update(panels_bytes=len(panels), panels_gzip_bytes=len(gzip.compress(panels, 6)),
               state_bytes=len(body), state_gzip_bytes=len(gzip.compress(body, 6)))
    for variant, name in ((0, "metrics"), (1, "metrics_per_expert")):
        publish_replicas(client, prefix, metrics, variant)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ClusterCollector(source))
        res[f"{name}_s"], _ = timed(lambda reg=registry: generate_latest(reg), repeats)
        text = generate_latest(registry)
        res[f"{name}_bytes"] = len(text)
        res[f"{name}_gzip_bytes"] = len(gzip.compress(text, 6))
        res[f"{name}_samples"] = sum(len(f.samples) for f in text_string_to_metric_families(text.decode()))
    gc.unfreeze()
    return res


ROWS = [("fill_s", "setup: write Redis (not measured)", "s"), ("windows_shown", "load windows in the state", ""),
        ("state_s", "state(lookback=300)", "ms"), ("read_redis_s", "  read_redis", "ms"),
        ("views_s", "  build views", "ms"), ("render_s", "render_panels(state)", "ms"),
        ("panels_bytes", "/api/panels JSON", "KiB"), ("panels_gzip_bytes", "  gzip -6", "KiB"),
        ("state_json_s", "/api/state json.dumps", "ms"), ("state_bytes", "/api/state JSON", "KiB"),
        ("state_gzip_bytes", "  gzip -6", "KiB"),
        ("metrics_s", "/metrics generate_latest", "ms"), ("metrics_bytes", "  body", "KiB"),
        ("metrics_gzip_bytes", "  gzip -6", "KiB"), ("metrics_samples", "  samples", ""),
        ("metrics_per_expert_s", "/metrics, per_expert on", "ms"), ("metrics_per_expert_bytes", "  body", "KiB"),
        ("metrics_per_expert_gzip_bytes", "  gzip -6", "KiB"), ("metrics_per_expert_samples", "  samples", "")]


def cell(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v * 1e3:.1f} ms"
    if unit == "KiB":
        return f"{v / 1024:.1f} KiB"
    if unit == "s":
        return f"{v:.1f} s"
    return f"{v:,}"


def table(results: list[dict]) -> str:
    heads = [f"L={r['shape']['layers']} E={r['shape']['experts']} N={r['shape']['shards']}x"
             f"{r['shape']['slots_per_shard']} R={r['shape']['replicas']} W={r['shape']['windows']}" for r in results]
    rows = [(label, *(cell(r[k], unit) for r in results)) for k, label, unit in ROWS]
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(h), *(len(r[i + 1]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(["".ljust(w0), *(h.rjust(w) for h, w in zip(heads, ws))])]
    lines += ["  ".join([r[0].ljust(w0), *(c.rjust(w) for c, w in zip(r[1:], ws))]) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 58), ("experts", 256), ("shards", 8), ("slots-per-shard", 40),
                          ("replicas", 4), ("windows", 60), ("tokens", 256), ("top-k", 8), ("repeats", 5)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--window-s", type=float, default=5.0)
    ap.add_argument("--also-small", action="store_true", help="also run 4 layers x 8 experts on 2 x 5 slots")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    print_machine()
    shapes = [a]
    if a.also_small:
        shapes.append(argparse.Namespace(**{**vars(a), "layers": 4, "experts": 8, "shards": 2,
                                            "slots_per_shard": 5, "top_k": min(a.top_k, 2)}))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as d:
        info = LocalRedis.start(d, maxmemory_mb=2048)
        try:
            client = connect(info.settings())
            for i, shape in enumerate(shapes):
                results.append(measure(client, info, f"benchdash{i}", shape, a.repeats))
            client.close()
        finally:
            LocalRedis.stop(info)
    out = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], "-m", "bench.bench_dashboard", *sys.argv[1:]]),
           "repeats": a.repeats, "results": results}
    print(json.dumps(out, indent=1) if a.json else f"{out['command']}  (medians of {a.repeats})\n{table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
