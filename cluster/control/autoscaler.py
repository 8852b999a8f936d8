"""The autoscaler's control loop: read load windows, decide, migrate, reconcile, record events.

:class:`AutoscalerCore` holds no Ray or Serve code; the ``Autoscaler`` Serve deployment
(``moeyard.cluster.serving.app``) runs :meth:`AutoscalerCore.tick` on a thread and exposes
:meth:`AutoscalerCore.rebalance` to ``moeyard rebalance``. Every decision that acts (and
every change of the reason it holds back) is logged with its reason and pushed to the
event list in Redis for the dashboard and ``moeyard status``.

If Redis is unreachable the loop skips its turn (nothing to read, nowhere to publish)
and says so once; it acts again when Redis returns.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis
import torch

from moeyard.cluster.control.autoscale_policy import Decision, PolicyState, decide, decide_scale
from moeyard.cluster.control.migration import MigrationError, Migrator, ShardControl, reconcile, scale_target
from moeyard.cluster.control.placement_store import Event, push_event, read_placement, replica_epochs, write_placement
from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.router_service.placement import Placement
from moeyard.router_service.planner import min_balancedness

log = logging.getLogger("moeyard.autoscaler")


class RedisPublisher:
    """:class:`moeyard.cluster.control.migration.EpochPublisher` over the placement store."""

    def __init__(self, client, prefix: str, fingerprint: str):
        self.client, self.prefix, self.fingerprint = client, prefix, fingerprint

    def publish(self, placement: Placement) -> None:
        write_placement(self.client, self.prefix, placement, self.fingerprint)

    def replica_epochs(self) -> dict[str, int]:
        return replica_epochs(self.client, self.prefix)


@dataclass(frozen=True)
class LoadView:
    load: torch.Tensor
    """``[L, E]`` smoothed tokens per (MoE layer, logical expert) window."""
    assignments_per_s: float
    """Routed (token, expert) assignments per second over the lookback, all layers."""


class ShardFactory(Protocol):
    """Creates and removes expert shards (Ray actors in a cluster)."""

    def create(self, shard_id: int, assignments: dict[int, list[tuple[int, int]]]) -> None:
        """Start shard ``shard_id`` holding ``assignments`` (MoE layer -> [(slot, expert)]); wait until ready."""
        ...

    def remove(self, shard_id: int) -> None: ...


@dataclass
class TickResult:
    decision: str
    acted: bool
    epoch: int | None = None
    balancedness_before: float | None = None
    balancedness_after: float | None = None
    slots_moved: int = 0
    seconds: float = 0.0


class AutoscalerCore:
    """One cluster's autoscaler. ``load_reader(since_s) -> LoadView`` gives the smoothed load;
    ``factory`` (optional) adds and removes shards when ``settings`` bound their number."""

    def __init__(self, settings: AutoscalerSettings, client, prefix: str, fingerprint: str,
                 shards: ShardControl, load_reader, num_layers: int, num_experts: int,
                 factory: ShardFactory | None = None):
        self.settings = settings
        self.client = client
        self.prefix = prefix
        self.fingerprint = fingerprint
        self.shards = shards
        self.load_reader = load_reader
        self.factory = factory
        self.num_layers, self.num_experts = num_layers, num_experts
        self.state = PolicyState()
        self.migrator = Migrator(shards, RedisPublisher(client, prefix, fingerprint),
                                 drain_timeout_s=settings.drain_timeout_s)
        self._lock = threading.Lock()  # one decision / migration / reconcile at a time
        self._last_reason: str | None = None  # Decision.code of the last hold (events on change only)
        self._last_reconcile = 0.0
        self._redis_failing = False
        self._last_placement: Placement | None = None
        self.rebalances = 0
        self.last_turn: float | None = None
        """Unix seconds when :meth:`loop_once` last finished a turn (None before the first)."""
        self.event_hooks: list = []
        """Called with every :class:`Event` (metrics); a hook that raises is logged, not propagated."""

    # -- helpers -----------------------------------------------------------------------
    def current(self) -> Placement:
        """The published placement. If Redis lost it (restarted without persistence), the last
        one this autoscaler saw is published again, so routers and restarted shards find it."""
        stored = read_placement(self.client, self.prefix)
        if stored is None:
            if self._last_placement is None:
                raise RuntimeError("no placement published yet (the shard manager publishes it at start)")
            write_placement(self.client, self.prefix, self._last_placement, self.fingerprint)
            self._event(Event("republish", f"the placement store was empty (Redis restarted?); published "
                                           f"epoch {self._last_placement.epoch} again",
                              epoch_before=self._last_placement.epoch, epoch_after=self._last_placement.epoch))
            return self._last_placement
        if stored.fingerprint != self.fingerprint:
            raise RuntimeError(f"the published placement is for {stored.fingerprint!r}, not {self.fingerprint!r}")
        self._last_placement = stored.placement
        return stored.placement

    def _event(self, event: Event) -> None:
        log.info("autoscaler %s: %s", event.kind, event.reason)
        for hook in self.event_hooks:
            try:
                hook(event)
            except Exception:
                log.exception("autoscaler event hook failed")
        try:
            push_event(self.client, self.prefix, event)
        except Exception as e:
            log.warning("could not store autoscaler event (%s)", e)

    def _apply(self, current: Placement, decision: Decision, now: float) -> TickResult:
        t0 = time.monotonic()
        try:
            placement, report = self.migrator.apply(current, decision.plan)
        except MigrationError as e:
            self._event(Event("rebalance_failed", f"{decision.reason}; {e}", epoch_before=current.epoch,
                              balancedness_before=decision.balancedness_before))
            raise
        self.state.last_move = now
        self.state.below_since = None
        self.rebalances += 1
        self._last_placement = placement
        dt = time.monotonic() - t0
        self._event(Event("rebalance", decision.reason, epoch_before=current.epoch, epoch_after=placement.epoch,
                          balancedness_before=decision.balancedness_before,
                          balancedness_after=decision.balancedness_after, duration_s=dt,
                          slots_moved=report.slots_moved, bytes_loaded=report.bytes_loaded))
        return TickResult(decision.reason, True, placement.epoch, decision.balancedness_before,
                          decision.balancedness_after, report.slots_moved, dt)

    # -- the loop's work ---------------------------------------------------------------
    def tick(self, now: float | None = None, force: bool = False) -> TickResult:
        """Read, decide and (maybe) migrate once. Raises on Redis errors (the loop logs them)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            current = self.current()
            view = self.load_reader(self.settings.lookback_s)
            if self.factory is not None and not force:
                step, why = decide_scale(view.assignments_per_s / current.num_shards, current.num_shards,
                                         self.state, self.settings, now)
                if step:
                    return self._scale(current, view.load, step, why, now)
            decision = decide(view.load, current, self.state, self.settings, now, force=force)
            if not decision.act:
                if decision.code != self._last_reason or force:
                    self._event(Event("skip", decision.reason, epoch_before=current.epoch,
                                      balancedness_before=decision.balancedness_before,
                                      balancedness_after=decision.balancedness_after))
                self._last_reason = decision.code
                return TickResult(decision.reason, False, current.epoch, decision.balancedness_before,
                                  decision.balancedness_after)
            self._last_reason = None
            return self._apply(current, decision, now)

    def _scale(self, current: Placement, load: torch.Tensor, step: int, why: str, now: float) -> TickResult:

        t0 = time.monotonic()
        n = current.num_shards + step
        target = scale_target(load, current, n)
        kind = "scale_up" if step > 0 else "scale_down"
        try:
            if step > 0:
                placement, report = self.migrator.scale_up(current, target, self.factory.create)
            else:
                placement, report = self.migrator.scale_down(current, target, self.factory.remove)
        except Exception as e:
            self._event(Event(f"{kind}_failed", f"{why}; {e}", epoch_before=current.epoch))
            raise
        self.state.last_move = now
        self.state.scale_since, self.state.scale_direction = None, 0
        self._last_placement = placement
        dt = time.monotonic() - t0
        before, after = min_balancedness(load, current), min_balancedness(load, placement)
        self._event(Event(kind, why, epoch_before=current.epoch, epoch_after=placement.epoch,
                          balancedness_before=before, balancedness_after=after, duration_s=dt,
                          slots_moved=report.slots_moved, bytes_loaded=report.bytes_loaded))
        return TickResult(why, True, placement.epoch, before, after, report.slots_moved, dt)

    def rebalance(self) -> TickResult:
        """Plan and apply now (``moeyard rebalance``), whatever the threshold and cool-down say."""
        return self.tick(force=True)

    def reconcile(self, shard_ids) -> dict[int, tuple[int, int]]:
        """Make every shard hold its part of the current placement (after a restart)."""
        with self._lock:
            current = self.current()
            live = replica_epochs(self.client, self.prefix)
            if any(e != current.epoch for e in live.values()):
                return {}  # replicas still switching: a migration's copies are in flux
            fixed = reconcile(self.shards, current, shard_ids)
            if fixed:
                self._event(Event("reconcile", f"shards {sorted(fixed)} reloaded/released copies to match "
                                               f"epoch {current.epoch}: {fixed}", epoch_before=current.epoch,
                                  epoch_after=current.epoch))
            return fixed

    def loop_once(self) -> None:
        """One turn of the background loop; never raises. ``last_turn`` (unix seconds) is when the last one
        finished: the dashboard warns when it stops advancing (a stalled balancer)."""
        try:
            now = time.monotonic()
            if now - self._last_reconcile >= self.settings.reconcile_interval_s:
                self._last_reconcile = now
                try:
                    self.reconcile(range(self.current().num_shards))
                except Exception as e:
                    if not isinstance(e, _redis_errors()):
                        log.warning("reconcile failed: %s", e)
                    else:
                        raise
            if self.settings.enabled:
                self.tick(now)
            if self._redis_failing:
                self._redis_failing = False
                log.info("Redis reachable again; the autoscaler resumes")
        except _redis_errors() as e:
            self.state.below_since = None  # no load seen meanwhile: the sustain clock starts again
            self._last_reason = None  # the first decision after the outage is recorded
            if not self._redis_failing:
                self._redis_failing = True
                log.warning("Redis unreachable (%s); the autoscaler waits for it", type(e).__name__)
        except Exception as e:
            log.exception("autoscaler turn failed: %s", e)
        self.last_turn = time.time()


def _redis_errors():
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
