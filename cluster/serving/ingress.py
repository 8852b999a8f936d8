"""The ``ApiIngress`` deployment: the public gRPC API (moeyard.v1.Inference, health, reflection) and the
output sink the attention replicas stream their per-step tokens to."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ray import serve

from moeyard.attention.tokenizer import load_tokenizer
from moeyard.cluster.infra.tls import api_server_credentials, shard_server_credentials
from moeyard.cluster.serving.api_server import serve_api
from moeyard.cluster.serving.common import cluster_config, read_token_file
from moeyard.cluster.serving.output_sink import OutputSink
from moeyard.cluster.serving.serve_backend import ServeBackend
from moeyard.model.spec import load_spec


@dataclass(frozen=True)
class OutputSinkStats:
    """The ingress's output sink: where it listens, and what it has received."""

    address: str
    batches: int
    """Messages received (one per replica step)."""
    deltas: int
    """Request deltas passed on to their streams."""
    dropped: int
    """Deltas for a key that was never open here, or with a negative offset."""
    api_address: str | None
    late: int = 0
    """Deltas that arrived after their request had ended: its last item, which lists every output
    token, came on the Serve call first (harmless: the tokens were already delivered)."""


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2,
                  graceful_shutdown_timeout_s=30)
class ApiIngress:
    """The public gRPC API (moeyard.v1.Inference, health, reflection)."""

    async def __init__(self, cfg: dict, replicas, shard_manager, autoscaler=None, dashboard=None):
        self.cfg = c = cluster_config(cfg)
        spec = load_spec(c.model_dir())
        token = None
        if c.require_auth:
            token = os.environ.get("MOEYARD_API_TOKEN") or read_token_file(c.token_file())
        self.sink = None
        if c.output_sink:
            self.sink = OutputSink(c.shard_host, shard_server_credentials(c.tls))
            await self.sink.start()
        backend = ServeBackend(replicas, shard_manager, spec, c, sink=self.sink)
        self.autoscaler = autoscaler
        self.dashboard = dashboard
        self.server = await serve_api(backend, load_tokenizer(c.model_dir()), host=c.api_host, port=c.api_port,
                                      auth_token=token, require_auth=c.require_auth,
                                      server_credentials=api_server_credentials(c.tls),
                                      max_new_tokens_limit=c.engine.max_new_tokens_limit)

    async def address(self) -> str:
        return self.server.address

    async def config(self) -> dict:
        """The cluster config this app runs with (secrets are file paths, never values)."""
        return self.cfg.model_dump(mode="json")

    async def drain(self, timeout_s: float | None = None) -> None:
        """Refuse new calls (health NOT_SERVING) and let running ones finish, for at most
        ``timeout_s`` (default ``drain_timeout_s``); then stop the API server."""
        if self.server is not None:
            await self.server.stop(grace=self.cfg.drain_timeout_s if timeout_s is None else timeout_s)
        if getattr(self, "sink", None) is not None:
            await self.sink.stop(0)

    async def __del__(self):
        # graceful shutdown (serve.delete, a redeploy): streams in flight finish first
        await self.drain()

    async def output_sink_stats(self) -> OutputSinkStats | None:
        """The output sink's address and counters, and the API address of this ingress; None when the sink is off."""
        sink = self.sink
        if sink is None:
            return None
        return OutputSinkStats(sink.address, sink.batches, sink.deltas, sink.dropped,
                               self.server.address if self.server is not None else None, late=sink.late)

    async def dashboard_address(self) -> str | None:
        """The dashboard's URL (``http://host:port/``), None when it is off."""
        return await self.dashboard.address.remote() if self.dashboard is not None else None

    async def check_health(self):
        if self.server is None:
            raise RuntimeError("API server not running")
