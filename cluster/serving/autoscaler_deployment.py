"""The ``Autoscaler`` deployment: reads the load windows, rebalances live and reconciles shards
(the decisions are :mod:`moeyard.cluster.control.autoscaler`'s; this runs them on a thread)."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading

from ray import serve

from moeyard.cluster.control.autoscaler import AutoscalerCore, TickResult
from moeyard.cluster.control.autoscaler_metrics import AutoscalerMetrics
from moeyard.cluster.control.load_reader import read_load_view
from moeyard.cluster.control.migration import GrpcShardControl
from moeyard.cluster.control.placement_store import Event, read_events
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.infra.telemetry import TelemetryPublisher
from moeyard.cluster.serving.common import cluster_config, internal_tls, shard_resolver
from moeyard.router_service.grpc_transport import GrpcTransport

log = logging.getLogger("moeyard.serve")


class ServeShardFactory:
    """:class:`moeyard.cluster.control.autoscaler.ShardFactory` through the ShardManager deployment."""

    def __init__(self, shard_manager):
        self.shard_manager = shard_manager

    def create(self, shard_id: int, assignments: dict[int, list[tuple[int, int]]]) -> None:
        self.shard_manager.add_shard.remote(shard_id, assignments).result(timeout_s=600)

    def remove(self, shard_id: int) -> None:
        self.shard_manager.remove_shard.remote(shard_id).result(timeout_s=120)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2)
class Autoscaler:
    """Reads the load windows, rebalances live and reconciles shards (see ``moeyard.cluster.control.autoscaler``)."""

    async def __init__(self, cfg: dict, shard_manager):
        self.cfg = c = cluster_config(cfg)
        self.core = None
        self._stop = threading.Event()
        info = await shard_manager.placement_info.remote()
        if info is None or not c.redis.enabled:
            log.info("autoscaler off: %s", "dense model" if info is None else "no Redis configured")
            return
        client = connect(c.redis)
        prefix = c.redis.key_prefix
        L, E = info.num_layers, info.num_experts
        self.transport = GrpcTransport(shard_resolver(c), **internal_tls(c))
        load_reader = functools.partial(read_load_view, client, prefix, num_layers=L, num_experts=E,
                                        window_s=c.redis.window_s,
                                        half_life_windows=c.autoscaler.half_life_windows)
        factory = ServeShardFactory(shard_manager) if c.autoscaler.min_shards is not None else None
        self.core = AutoscalerCore(c.autoscaler, client, prefix, info.fingerprint,
                                   GrpcShardControl(self.transport), load_reader, L, E, factory)
        self.metrics = AutoscalerMetrics()
        self.core.event_hooks.append(self.metrics.observe)
        self.telemetry = TelemetryPublisher(lambda: client, prefix, "autoscaler", "0", self.metrics.registry,
                                            summary_fn=self._summary,
                                            interval_s=c.dashboard.telemetry_interval_s).start()
        self._thread = threading.Thread(target=self._loop, name="autoscaler", daemon=True)
        self._thread.start()

    def _summary(self) -> dict:
        """For the dashboard: when the loop last finished a turn (a stalled balancer stops advancing it)."""
        return {"last_turn": self.core.last_turn, "interval_s": self.cfg.autoscaler.interval_s,
                "enabled": self.cfg.autoscaler.enabled}

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.autoscaler.interval_s):
            self.core.loop_once()

    async def rebalance(self) -> TickResult:
        """Plan and apply a placement now (``moeyard rebalance``)."""
        if self.core is None:
            raise RuntimeError("the autoscaler is off (dense model or no Redis configured)")
        return await asyncio.to_thread(self.core.rebalance)

    async def events(self, limit: int = 50) -> list[Event]:
        if self.core is None:
            return []
        return await asyncio.to_thread(read_events, self.core.client, self.core.prefix, limit)

    def __del__(self):
        self._stop.set()
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.stop()
