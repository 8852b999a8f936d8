"""What the Serve deployments share: the config they are built with, names, Ray resources, secrets."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import ray

from moeyard.cluster.config import ClusterConfig
from moeyard.cluster.infra.tls import router_channel_credentials, router_channel_options
from moeyard.model.dtypes import dtype_name, resolve_dtype
from moeyard.model.spec import ModelSpec

APP_NAME = "moeyard"


def cluster_config(d: dict) -> ClusterConfig:
    """The config a deployment is bound with (a plain dict, so that it also renders into ``serveConfigV2``)."""
    return ClusterConfig.model_validate(d)


def replica_id() -> str:
    """This process's id in Redis keys (letters, digits, ``_.-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getpid()}")[:60]


def shard_actor_name(cfg: ClusterConfig, shard: int) -> str:
    return f"{cfg.namespace}-shard-{shard}"


def compute_dtype_name(cfg: ClusterConfig, spec: ModelSpec) -> str:
    """The compute dtype the replicas use, which the shards must use too."""
    return dtype_name(resolve_dtype(cfg.dtype, spec.torch_dtype))


def shard_resolver(cfg: ClusterConfig):
    """Shard address lookup for the transport. Runs on the router's thread, so it is
    quick: a shard that is restarting fails the lookup (the transport reports it
    unavailable and the dispatcher uses other copies) rather than stalling every request."""
    def resolve(shard: int) -> str:
        actor = ray.get_actor(shard_actor_name(cfg, shard), namespace=cfg.namespace)
        return ray.get(actor.address.remote(), timeout=3)
    return resolve


def internal_tls(cfg: ClusterConfig) -> dict:
    """``GrpcTransport`` / ``SinkPusher`` keyword arguments for mutual TLS towards the shards and the
    ingress's output sink (empty: plaintext)."""
    if not cfg.tls.internal_enabled:
        return {}
    return {"channel_credentials": router_channel_credentials(cfg.tls),
            "channel_options": router_channel_options(cfg.tls)}


def pin(resource: str | None) -> dict[str, float] | None:
    """A token amount of a custom resource: enough to keep an actor on the nodes that have it."""
    return {resource: 0.001} if resource else None


def actor_options(num_cpus: float, resource: str | None, num_gpus: float = 0) -> dict:
    opts: dict = {"num_cpus": num_cpus}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    if resource:
        opts["resources"] = pin(resource)
    return opts


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise RuntimeError(f"API token file {path} cannot be read ({e.strerror}); "
                           "set require_auth: false to run without authentication") from None
    if not token:
        raise RuntimeError(f"API token file {path} is empty")
    return token
