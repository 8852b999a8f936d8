"""Builds :class:`~moeyard.cluster.dashboard.state.DashboardState` from Redis and the shard manager.

The dashboard keeps no history of its own: load windows, the placement, the
autoscaler's events and every process's telemetry are in Redis (see
``moeyard.cluster.control.load_store``, ``moeyard.cluster.control.placement_store``,
``moeyard.cluster.infra.telemetry``);
shard status comes from the shard manager (cached for ``shard_status_ttl_s``).
A restarted dashboard shows the same thing at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from moeyard.cluster.control.load_store import LoadWindows, read_load
from moeyard.cluster.control.placement_store import read_events, read_placement
from moeyard.cluster.dashboard import views
from moeyard.cluster.dashboard.state import DashboardState, ShardHealth
from moeyard.cluster.infra.telemetry import Published, read_published
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.cluster.settings.redis import redact_text
from moeyard.model.economics import Economics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisSnapshot:
    """What one refresh read from Redis."""

    windows: LoadWindows | None
    placement: object | None
    events: list[dict]
    telemetry: list[Published]


class DashboardSource:
    """Reads the cluster's state for the dashboard's pages, JSON and ``/metrics``.

    Args:
        settings: dashboard settings (spans, hot factor, caches).
        client: redis-py client (``decode_responses=False``) or None when no Redis is configured.
        prefix: the cluster's Redis key prefix.
        window_s: length of a load window (``RedisSettings.window_s``).
        shard_status: returns ``ShardManager.status()`` (a list of dicts); may raise.
        model: the model's name for the header.
        economics: parameter economics of the checkpoint (None for none).
    """

    def __init__(self, settings: DashboardSettings, client, prefix: str, window_s: float,
                 shard_status: Callable[[], list[dict]] | None, model: str, economics: Economics | None,
                 clock: Callable[[], float] = time.time):
        self.settings, self.client, self.prefix, self.window_s = settings, client, prefix, window_s
        self.shard_status_fn, self.model, self.economics, self.clock = shard_status, model, economics, clock
        self._shards: tuple[float, list[ShardHealth]] | None = None
        self._shard_lock = threading.Lock()

    # -- sources ---------------------------------------------------------------------------------
    def read_redis(self, lookback_s: float) -> RedisSnapshot:
        """One consistent-enough read (raises on a Redis error)."""
        c, p = self.client, self.prefix
        windows = read_load(c, p, lookback_s + self.window_s, now=self.clock())
        stored = read_placement(c, p)
        return RedisSnapshot(windows, stored.placement if stored is not None else None,
                             read_events(c, p, 100), read_published(c, p))

    def shards(self) -> list[ShardHealth]:
        if self.shard_status_fn is None:
            return []
        now = time.monotonic()
        with self._shard_lock:
            if self._shards is not None and now - self._shards[0] < self.settings.shard_status_ttl_s:
                return self._shards[1]
        try:
            shards = [views.shard_health(s) for s in self.shard_status_fn()]
        except Exception as e:  # the manager restarting: say so, do not fail the page
            log.warning("shard status unavailable (%s)", type(e).__name__)
            shards = [ShardHealth(shard_id=-1, healthy=False, error=f"shard manager: {type(e).__name__}: {e}")]
        with self._shard_lock:
            self._shards = (now, shards)
        return shards

    # -- the state -------------------------------------------------------------------------------
    def state(self, lookback_s: float | None = None) -> DashboardState:
        """The dashboard's state over the last ``lookback_s`` seconds (default from the settings)."""
        lookback_s = self.settings.lookback_s if lookback_s is None else lookback_s
        now = self.clock()
        notes: list[str] = []
        snap, redis_error = None, None
        if self.client is None:
            notes.append("no Redis configured: load, placement history, events and serving figures are off")
        else:
            try:
                snap = self.read_redis(lookback_s)
            except Exception as e:
                redis_error = redact_text(f"{type(e).__name__}: {e}")
                notes.append(f"Redis unreachable: {redis_error}")
        return self._build(now, lookback_s, snap, redis_error, notes)

    def _build(self, now: float, lookback_s: float, snap: RedisSnapshot | None, redis_error: str | None,
               notes: list[str]) -> DashboardState:
        s = self.settings
        placement = heatmap = series = balancer = None
        events, replicas, warnings = [], [], []
        if snap is not None:
            if snap.placement is not None:
                placement = views.placement_view(snap.placement)
            else:
                notes.append("no placement published yet")
            w = snap.windows
            window_s = (w.window_s if w is not None and w.window_s else None) or self.window_s
            if w is not None and w.num_windows:
                w = _since(w, now - lookback_s - window_s)
                heatmap = views.heatmap_view(w, now, window_s, s.heatmap_span_s, s.hot_factor,
                                             s.collapse_fraction, s.collapse_windows)
                if placement is not None:
                    series = views.shard_series(w, now, window_s, placement.slots_per_shard)
            if heatmap is None:
                notes.append("no whole load window yet: send some requests")
            events = views.event_views(snap.events, series)
            replicas = [views.replica_health(p, now) for p in snap.telemetry if p.component == "replica"]
            autoscaler = next((p.summary for p in snap.telemetry if p.component == "autoscaler"), None)
            balancer = views.balancer_view(snap.events, autoscaler, now, s.autoscaler_stall_s)
            if balancer.stalled:
                warnings.append(f"the autoscaler has not finished a turn for {balancer.seconds_since_turn:.0f} s: "
                                "the balancer may be stalled (see the autoscaler's log)")
            if not replicas:
                notes.append("no attention replica has published telemetry yet")
        serving = views.serving_view(replicas, self.shards())
        return DashboardState(time=now, model=self.model, redis_ok=snap is not None, redis_error=redis_error,
                              placement=placement, heatmap=heatmap, shard_series=series, events=events,
                              serving=serving, economics=self.economics, lookback_s=lookback_s, notes=notes,
                              balancer=balancer, warnings=warnings)


def _since(w: LoadWindows, t0: float) -> LoadWindows:
    """The windows that start at or after ``t0``."""
    keep = w.starts >= t0
    if bool(keep.all()):
        return w
    return LoadWindows(w.starts[keep], w.expert_counts[keep], w.tokens[keep], w.reporters[keep],
                       w.slot_counts[keep], w.slot_complete[keep], w.num_slots, w.epoch, w.tokens_dropped,
                       w.entries_missing, w.window_s)
