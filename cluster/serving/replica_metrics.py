"""Serving and expert-load metrics of one attention replica.

Prometheus metrics in vLLM's naming style (``moeyard:...``) live in a private
registry that :class:`moeyard.cluster.infra.telemetry.TelemetryPublisher` ships to Redis;
:meth:`ReplicaMetrics.summary` gives the dashboard recent percentiles and rates
(over the last ``recent_s`` seconds), which cumulative histograms cannot.

Expert tokens are exported per (MoE layer, shard) by default: bounded
cardinality (``L x N``); per (layer, expert) only when ``per_expert`` is set
(``L x E`` series per replica; the dashboard reads the full detail from Redis anyway).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moeyard.router_service.grpc_transport import WireStats
from moeyard.router_service.load_recorder import LoadSnapshot
from moeyard.router_service.moe_router import OverflowCounts

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
FINISH_REASONS = ("stop", "length")
FAILURE_REASONS = ("invalid_argument", "resource_exhausted", "unavailable", "aborted")


@dataclass
class RequestTimer:
    """One request's clock, kept by the code that streams it."""

    start: float = field(default_factory=time.monotonic)
    last: float | None = None
    """When the previous token(s) came out; None before the first."""
    generated: int = 0


def _percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


class _Recent:
    """(time, value) samples of the last ``span_s`` seconds."""

    def __init__(self, span_s: float):
        self.span_s = span_s
        self._q: deque[tuple[float, float]] = deque()

    def add(self, t: float, v: float) -> None:
        self._q.append((t, v))

    def values(self, now: float) -> list[float]:
        while self._q and self._q[0][0] < now - self.span_s:
            self._q.popleft()
        return [v for _, v in self._q]


class ReplicaMetrics:
    """Thread-safe: the request streams (event loop), the load flusher thread and the telemetry
    thread all call in."""

    def __init__(self, per_expert: bool = False, recent_s: float = 60.0):
        self.per_expert = per_expert
        self.recent_s = recent_s
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.running = Gauge("moeyard:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("moeyard:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("moeyard:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)",
                              registry=r)
        self.epoch = Gauge("moeyard:placement_epoch", "Placement epoch this replica routes with", registry=r)
        self.ttft = Histogram("moeyard:time_to_first_token_seconds", "Time from request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("moeyard:inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("moeyard:e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moeyard:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("moeyard:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("moeyard:request_success", "Requests finished, by finish reason",
                               ["finished_reason"], registry=r)
        self.failure = Counter("moeyard:request_failure", "Requests that ended with an error, by reason",
                               ["reason"], registry=r)
        self.flush_failures = Counter("moeyard:load_flush_failures", "Load-window flushes Redis did not confirm",
                                      registry=r)
        self.tokens_dropped = Counter("moeyard:load_tokens_dropped",
                                      "Tokens whose load counts were dropped (Redis down past the buffer)",
                                      registry=r)
        self.expert_tokens = Counter("moeyard:expert_tokens", "(token, expert) rows routed to each shard",
                                     ["layer", "shard"], registry=r)
        self.expert_tokens_by_expert = Counter(
            "moeyard:expert_tokens_by_expert", "(token, expert) rows routed to each logical expert",
            ["layer", "expert"], registry=r) if per_expert else None
        self.steps = Counter("moeyard:engine_steps", "Model steps run", registry=r)
        self.moe_overflow = Counter(
            "moeyard:moe_overflow", "(token, expert) assignments past their expert's capacity, per MoE layer and "
            "outcome (dropped: the token kept its residual; rerouted: to its next-best expert with room)",
            ["layer", "outcome"], registry=r)
        self.wire_bytes = Counter(
            "moeyard:expert_wire_bytes", "Bytes sent to the expert shards: hidden states (each token once per "
            "shard) and the index naming a row per (token, expert)", ["part"], registry=r)
        self.wire_bytes_per_assignment = Counter(
            "moeyard:expert_wire_bytes_per_assignment", "What the hidden states would have cost sent once per "
            "(token, expert) row (wire format 1), for comparison", registry=r)
        self.wire_bytes_per_step = Gauge(
            "moeyard:expert_wire_bytes_per_step", "Bytes sent to the shards per model step since the previous "
            "publish", registry=r)
        for part in ("hidden", "index"):
            self.wire_bytes.labels(part=part)
        for reason in FINISH_REASONS:  # every series exists from the start (rate() needs a zero)
            self.success.labels(finished_reason=reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(reason=reason)
        self._lock = threading.Lock()
        self._ttft_recent = _Recent(recent_s)
        self._itl_recent = _Recent(recent_s)
        self._tokens_recent = _Recent(recent_s)
        self._finished = 0
        self._failed = 0
        self._created = time.monotonic()
        self._flush_seen = (0, 0)  # (flushes_failed, tokens_dropped) already counted
        self._wire_seen = (WireStats(), 0)  # (wire stats, steps) already counted
        self._overflow_seen: OverflowCounts | None = None

    # -- request path ------------------------------------------------------------------------
    def tokens(self, timer: RequestTimer, n: int, now: float | None = None) -> None:
        """``n`` new tokens of one request came out now."""
        if n <= 0:
            return
        now = time.monotonic() if now is None else now
        self.generation_tokens.inc(n)
        with self._lock:
            self._tokens_recent.add(now, n)
            if timer.last is None:
                ttft = now - timer.start
                self.ttft.observe(ttft)
                self._ttft_recent.add(now, ttft)
            else:
                gap = (now - timer.last) / n  # a step that emits several tokens spreads its gap
                for _ in range(n):
                    self.itl.observe(gap)
                self._itl_recent.add(now, gap)
        timer.last = now
        timer.generated += n

    def finished(self, timer: RequestTimer, reason: str, prompt_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.success.labels(finished_reason=reason or "unknown").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.e2e.observe(now - timer.start)
        with self._lock:
            self._finished += 1

    def failed(self, reason: str) -> None:
        self.failure.labels(reason=reason).inc()
        with self._lock:
            self._failed += 1

    # -- load flusher thread -----------------------------------------------------------------
    def expert_load(self, snap: LoadSnapshot, num_shards: int) -> None:
        """Add one load snapshot: ``slot_counts [L, P]`` summed per shard (slot ``p`` on shard
        ``p // (P / num_shards)``), ``expert_counts [L, E]`` per expert when enabled."""
        if snap.tokens == 0:
            return
        L, P = snap.slot_counts.shape
        if num_shards >= 1 and P % num_shards == 0:
            per_shard = snap.slot_counts.view(L, num_shards, P // num_shards).sum(dim=2)
            for layer, shard in torch.nonzero(per_shard).tolist():
                self.expert_tokens.labels(layer=str(layer), shard=str(shard)).inc(int(per_shard[layer, shard]))
        if self.expert_tokens_by_expert is not None:
            for layer, e in torch.nonzero(snap.expert_counts).tolist():
                self.expert_tokens_by_expert.labels(layer=str(layer), expert=str(e)).inc(
                    int(snap.expert_counts[layer, e]))

    # -- telemetry thread --------------------------------------------------------------------
    def engine_state(self, running: int, waiting: int, kv_usage: float, epoch: int | None,
                     flushes_failed: int = 0, tokens_dropped: int = 0) -> None:
        """Refresh the gauges (and the flusher's cumulative loss counters) before a publish."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        if epoch is not None:
            self.epoch.set(epoch)
        with self._lock:
            seen_f, seen_d = self._flush_seen
            self._flush_seen = (max(seen_f, flushes_failed), max(seen_d, tokens_dropped))
        if flushes_failed > seen_f:
            self.flush_failures.inc(flushes_failed - seen_f)
        if tokens_dropped > seen_d:
            self.tokens_dropped.inc(tokens_dropped - seen_d)

    def overflow(self, counts: OverflowCounts) -> None:
        """Add the router's overflow since the previous call (its counts are cumulative, per MoE layer)."""
        with self._lock:
            seen, self._overflow_seen = self._overflow_seen, counts
        if seen is None:  # every layer's series exists from the first publish (rate() needs a zero)
            seen = OverflowCounts((0,) * len(counts.dropped), (0,) * len(counts.rerouted))
        for outcome, now, before in (("dropped", counts.dropped, seen.dropped),
                                     ("rerouted", counts.rerouted, seen.rerouted)):
            for layer, (n, b) in enumerate(zip(now, before)):
                self.moe_overflow.labels(layer=str(layer), outcome=outcome).inc(max(0, n - b))

    def wire(self, stats: WireStats, steps: int) -> None:
        """Add what the transport sent since the previous call (its counters are cumulative)."""
        with self._lock:
            seen, seen_steps = self._wire_seen
            self._wire_seen = (stats, steps)
        self.steps.inc(max(0, steps - seen_steps))
        self.wire_bytes.labels(part="hidden").inc(max(0, stats.hidden_bytes - seen.hidden_bytes))
        self.wire_bytes.labels(part="index").inc(max(0, stats.index_bytes - seen.index_bytes))
        self.wire_bytes_per_assignment.inc(max(0, stats.per_assignment_bytes - seen.per_assignment_bytes))
        if steps > seen_steps:
            self.wire_bytes_per_step.set((stats.sent_bytes - seen.sent_bytes) / (steps - seen_steps))

    def summary(self, now: float | None = None) -> dict:
        """Recent figures for the dashboard: tokens/s and TTFT/ITL p50/p99 over ``recent_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            ttft = self._ttft_recent.values(now)
            itl = self._itl_recent.values(now)
            toks = self._tokens_recent.values(now)
            finished, failed = self._finished, self._failed
            overflow = self._overflow_seen
        span = min(self.recent_s, max(now - self._created, 1.0))  # a young replica: its age
        return {"tokens_per_s": sum(toks) / span,
                "ttft_p50_s": _percentile(ttft, 0.5), "ttft_p99_s": _percentile(ttft, 0.99),
                "itl_p50_s": _percentile(itl, 0.5), "itl_p99_s": _percentile(itl, 0.99),
                "requests_finished": finished, "requests_failed": failed,
                **({"overflow_dropped": list(overflow.dropped), "overflow_rerouted": list(overflow.rerouted)}
                   if overflow is not None else {})}
