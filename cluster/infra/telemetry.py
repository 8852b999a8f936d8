"""Per-process metrics published to Redis, for the dashboard and its ``/metrics``.

Each attention replica and the autoscaler keep their Prometheus metrics in a
private :class:`prometheus_client.CollectorRegistry` and, about once a second,
write a snapshot of it (plus a small summary for the dashboard) to Redis::

    {prefix}:telemetry:{component}:{source}   string, JSON, EXPIRE ttl_s

    {"component": "replica", "source": "<replica id>", "time": <unix s>,
     "summary": {...}, "families": [{"name", "type", "documentation",
                                     "samples": [[sample_name, {labels}, value], ...]}]}

The dashboard (one process, anywhere in the cluster) reads every snapshot and
re-exports the families with a ``{component}`` label naming the source (so
``moeyard:num_requests_running{replica="..."}``). A process that dies stops
refreshing its key and drops out after the TTL; Prometheus sees its counters
go, as for any restarted target. Pushing through Redis keeps the dashboard
stateless and works the same on one machine and on Kubernetes.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from moeyard.cluster.settings.redis import KEY_PART_PATTERN, redact_text

log = logging.getLogger(__name__)

TELEMETRY_TTL_S = 15
_SKIP_SUFFIXES = ("_created",)  # creation timestamps: noise for our use


def telemetry_key(prefix: str, component: str, source: str) -> str:
    return f"{prefix}:telemetry:{component}:{source}"


@dataclass(frozen=True)
class Published:
    """One process's snapshot, as read back from Redis."""

    component: str
    source: str
    time: float
    summary: dict
    families: list[dict]


def serialize_registry(registry: CollectorRegistry) -> list[dict]:
    """The registry's families as JSON-able dicts (``_created`` samples left out)."""
    out = []
    for m in registry.collect():
        samples = [[s.name, dict(s.labels), float(s.value)] for s in m.samples
                   if not s.name.endswith(_SKIP_SUFFIXES)]
        out.append({"name": m.name, "type": m.type, "documentation": m.documentation, "samples": samples})
    return out


def encode(component: str, source: str, registry: CollectorRegistry | None, summary: dict,
           now: float | None = None) -> str:
    return json.dumps({"component": component, "source": source, "time": time.time() if now is None else now,
                       "summary": summary, "families": serialize_registry(registry) if registry else []})


def decode(raw: bytes | str) -> Published:
    """Inverse of :func:`encode`; ``ValueError`` if malformed."""
    try:
        d = json.loads(raw)
        fams = d.get("families", [])
        if not isinstance(fams, list) or not isinstance(d.get("summary", {}), dict):
            raise ValueError("families must be a list and summary an object")
        return Published(str(d["component"]), str(d["source"]), float(d["time"]), d.get("summary", {}), fams)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed telemetry snapshot: {e}") from None


def publish(client, prefix: str, component: str, source: str, registry: CollectorRegistry | None,
            summary: dict, ttl_s: int = TELEMETRY_TTL_S) -> None:
    client.set(telemetry_key(prefix, component, source), encode(component, source, registry, summary), ex=ttl_s)


def read_published(client, prefix: str, component: str | None = None) -> list[Published]:
    """Every live snapshot (of ``component`` if given), sorted by (component, source); malformed ones skipped."""
    pattern = telemetry_key(prefix, component or "*", "*")
    keys = sorted(client.scan_iter(match=pattern, count=200))
    if not keys:
        return []
    out = []
    for raw in client.mget(keys):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            out.append(decode(raw))
        except ValueError as e:
            log.warning("%s", e)
    return sorted(out, key=lambda p: (p.component, p.source))


SINGLETONS = frozenset({"autoscaler"})
"""Components with one instance per cluster: their samples get no source label."""


def merge_families(snapshots: Iterable[Published]) -> list[Metric]:
    """Families of every snapshot merged by name, each sample labelled with its source
    (label name = the component, e.g. ``replica="host-123"``; none for :data:`SINGLETONS`).
    Families whose type differs from the first seen under the same name are dropped (a
    mixed-version cluster)."""
    merged: dict[str, Metric] = {}
    for snap in snapshots:
        for fam in snap.families:
            try:
                name, typ = fam["name"], fam["type"]
                m = merged.get(name)
                if m is None:
                    m = merged[name] = Metric(name, fam.get("documentation", ""), typ)
                elif m.type != typ:
                    continue
                source = {} if snap.component in SINGLETONS else {snap.component: snap.source}
                for sample_name, labels, value in fam["samples"]:
                    m.add_sample(sample_name, {**source, **labels}, float(value))
            except (KeyError, TypeError, ValueError):
                continue
    return list(merged.values())


class TelemetryPublisher:
    """A daemon thread that publishes ``registry`` and ``summary_fn()`` every ``interval_s``.

    Redis failures are counted and logged once per outage (the password redacted); the
    process keeps serving. ``before_publish`` (optional) refreshes gauges first.
    """

    def __init__(self, client_factory: Callable[[], object], prefix: str, component: str, source: str,
                 registry: CollectorRegistry | None, summary_fn: Callable[[], dict] = dict,
                 interval_s: float = 1.0, ttl_s: int = TELEMETRY_TTL_S,
                 before_publish: Callable[[], None] | None = None):
        if not re.fullmatch(KEY_PART_PATTERN, source) or not re.fullmatch(KEY_PART_PATTERN, component):
            raise ValueError(f"telemetry component/source must match {KEY_PART_PATTERN}: {component!r}/{source!r}")
        self.client_factory, self.prefix = client_factory, prefix
        self.component, self.source = component, source
        self.registry, self.summary_fn, self.before_publish = registry, summary_fn, before_publish
        self.interval_s, self.ttl_s = interval_s, max(ttl_s, int(3 * interval_s) + 1)
        self.failures = 0
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"telemetry-{component}", daemon=True)

    def start(self) -> "TelemetryPublisher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:  # leave at once rather than after the TTL
            self.client_factory().delete(telemetry_key(self.prefix, self.component, self.source))
        except Exception:
            pass

    def publish_now(self) -> bool:
        try:
            if self.before_publish is not None:
                self.before_publish()
            publish(self.client_factory(), self.prefix, self.component, self.source, self.registry,
                    self.summary_fn(), self.ttl_s)
        except Exception as e:
            self.failures += 1
            if not self._failing:
                log.warning("telemetry not published (%s); retrying quietly", redact_text(f"{type(e).__name__}: {e}"))
            self._failing = True
            return False
        if self._failing:
            log.info("telemetry published again")
        self._failing = False
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.publish_now()
