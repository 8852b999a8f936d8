"""The ``Dashboard`` deployment: the operator dashboard and ``/metrics`` on their own port
(see :mod:`moeyard.cluster.dashboard`)."""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve

from moeyard.cluster.dashboard.collect import DashboardSource
from moeyard.cluster.dashboard.server import DashboardServer
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.serving.common import cluster_config, read_token_file
from moeyard.model.economics import economics

log = logging.getLogger("moeyard.serve")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2)
class Dashboard:
    """The operator dashboard and ``/metrics`` on their own port (see ``moeyard.cluster.dashboard``)."""

    async def __init__(self, cfg: dict, shard_manager):
        self.cfg = c = cluster_config(cfg)
        self.server = None
        if not c.dashboard.enabled:
            return
        token = None
        if c.require_auth:
            token = os.environ.get("MOEYARD_API_TOKEN") if c.dashboard.token_file is None else None
            token = token or read_token_file(c.dashboard_token_file())
        client = connect(c.redis) if c.redis.enabled else None
        try:
            econ = await asyncio.to_thread(economics, c.model_dir(), c.moe_top_k)
        except Exception as e:  # an odd checkpoint must not keep the dashboard down
            log.warning("model economics unavailable: %s", e)
            econ = None

        def shard_status() -> list[dict]:
            return shard_manager.status.remote().result(timeout_s=10)

        source = DashboardSource(c.dashboard, client, c.redis.key_prefix, c.redis.window_s, shard_status,
                                 c.model_dir().name, econ)
        self.server = DashboardServer(source, token)
        await self.server.start(c.dashboard.host, c.dashboard.port)

    async def address(self) -> str | None:
        return self.server.address if self.server is not None else None

    async def check_health(self):
        if self.cfg.dashboard.enabled and (self.server is None or self.server.runner is None):
            raise RuntimeError("dashboard server not running")
