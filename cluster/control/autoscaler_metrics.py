"""Prometheus metrics of the autoscaler, counted from the events it records.

Published through :class:`moeyard.cluster.infra.telemetry.TelemetryPublisher` (component ``autoscaler``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from moeyard.cluster.control.placement_store import Event

MOVES = ("rebalance", "scale_up", "scale_down")
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class AutoscalerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.moves = Counter("moeyard:rebalances", "Placement changes applied or failed, by kind and outcome",
                             ["kind", "outcome"], registry=r)
        self.duration = Histogram("moeyard:rebalance_duration_seconds",
                                  "Wall time of an applied placement change (stage, publish, drain, release)",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.slots_moved = Counter("moeyard:slots_moved", "Expert copies loaded by placement changes", registry=r)
        self.migrated_bytes = Counter("moeyard:migrated_bytes", "Expert weight bytes loaded by placement changes",
                                      registry=r)
        for kind in MOVES:  # every series exists from the start (rate() needs a zero)
            for outcome in ("ok", "failed"):
                self.moves.labels(kind=kind, outcome=outcome)

    def observe(self, event: Event) -> None:
        """Count one autoscaler event (holds, reconciles and republishes are not moves)."""
        failed = event.kind.endswith("_failed")
        kind = event.kind.removesuffix("_failed")
        if kind not in MOVES:
            return
        self.moves.labels(kind=kind, outcome="failed" if failed else "ok").inc()
        if failed:
            return
        if event.duration_s is not None:
            self.duration.observe(event.duration_s)
        if event.slots_moved:
            self.slots_moved.inc(event.slots_moved)
        if event.bytes_loaded:
            self.migrated_bytes.inc(event.bytes_loaded)
