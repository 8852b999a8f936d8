"""The moeyard Ray Serve application.

One application, built from a :class:`~moeyard.cluster.config.ClusterConfig`, creates
everything: the expert shards (Ray actors with their own gRPC servers, created
by the :class:`~moeyard.cluster.serving.shard_manager.ShardManager` deployment), the attention
replicas (:class:`~moeyard.cluster.serving.attention_replica.AttentionReplica`, each an engine with
its own router reaching every shard over gRPC, counting expert load into Redis and following the
published placement), the :class:`~moeyard.cluster.serving.autoscaler_deployment.Autoscaler`
(rebalances live, reconciles shards), the
:class:`~moeyard.cluster.serving.dashboard_deployment.Dashboard` and the public gRPC API
(:class:`~moeyard.cluster.serving.ingress.ApiIngress`, which picks a replica per request through a
Serve handle: least loaded of two random choices).
"""

from __future__ import annotations

from moeyard.cluster.config import ClusterConfig
from moeyard.cluster.serving.attention_replica import AttentionReplica
from moeyard.cluster.serving.autoscaler_deployment import Autoscaler
from moeyard.cluster.serving.common import APP_NAME, actor_options, cluster_config
from moeyard.cluster.serving.dashboard_deployment import Dashboard
from moeyard.cluster.serving.ingress import ApiIngress
from moeyard.cluster.serving.shard_manager import ShardManager

__all__ = ["APP_NAME", "app_builder", "build_app"]


def build_app(cfg: ClusterConfig | dict):
    """The Serve application for ``cfg`` (``serve.run(build_app(cfg), name=APP_NAME)``)."""
    c = cfg if isinstance(cfg, ClusterConfig) else cluster_config(cfg)
    d = c.model_dump(mode="json")
    control = actor_options(0, c.ray_resources.control)  # 0 CPUs: the control plane never blocks scaling
    shards = ShardManager.options(ray_actor_options=control, graceful_shutdown_timeout_s=c.drain_timeout_s + 20).bind(d)
    e = c.engine
    replicas = AttentionReplica.options(
        num_replicas=c.attention_replicas,
        max_ongoing_requests=e.max_num_seqs + e.max_waiting + 8,
        ray_actor_options=actor_options(c.replica_num_cpus, c.ray_resources.attention,
                                        num_gpus=1 if c.attention_use_gpu else 0),
        graceful_shutdown_timeout_s=c.drain_timeout_s + 10).bind(d, shards)
    autoscaler = Autoscaler.options(ray_actor_options=control).bind(d, shards)
    dashboard = Dashboard.options(ray_actor_options=control).bind(d, shards)
    ingress = ApiIngress.options(ray_actor_options=control, graceful_shutdown_timeout_s=c.drain_timeout_s + 10)
    return ingress.bind(d, replicas, shards, autoscaler, dashboard)


def app_builder(args: dict):
    """Entry point for ``serveConfigV2`` (``import_path: moeyard.cluster.serving.app:app_builder``)."""
    return build_app(ClusterConfig.model_validate(args))
