"""An expert shard as a Ray actor: an :class:`ExpertServer` in its own process.

Ray places and restarts the process; the data path never goes through Ray:
routers call the shard's gRPC server directly (a Ray actor call costs several
times a gRPC call for the same tensor). The actor methods only serve the
control plane: where is the server (:meth:`ExpertShardActor.address`), is it up
(:meth:`ExpertShardActor.ready`), what does it hold (:meth:`ExpertShardActor.status`).

Restarts: :func:`create_shard_actor` sets ``max_restarts=-1``. A restarted
actor runs ``__init__`` again with the same arguments. Given the cluster's Redis
settings and placement fingerprint, it loads its part of the placement *published
now* (a migration may have moved slots since it was created); otherwise, or if
Redis does not answer within a second, the slots it was created with (the
autoscaler's reconciler then fixes any difference). It listens on a new port:
callers re-read :meth:`address` (e.g. ``GrpcTransport.refresh(shard)`` with an
address callable that asks the actor).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import ray
import torch

from moeyard.cluster.control.placement_store import read_placement
from moeyard.cluster.infra.net import node_ip
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.infra.tls import shard_server_credentials
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.cluster.settings.tls import TLSSettings
from moeyard.expert_actors.server import ExpertServer
from moeyard.rpc import WILDCARD_HOSTS


class ExpertShardActor:
    """Ray actor body (use :func:`create_shard_actor`, or ``ray.remote(ExpertShardActor)``)."""

    def __init__(self, shard_id: int, model_dir: str, assignments: Mapping[int, Iterable[tuple[int, int]]],
                 dtype: str = "float32", host: str = "127.0.0.1", num_threads: int | None = None,
                 port: int = 0, redis: dict | None = None, fingerprint: str | None = None,
                 tls: dict | None = None, device: str = "auto", cpu_matmul: str = "auto",
                 deterministic: bool = False):
        if num_threads:
            # before anything allocates torch's thread pool
            torch.set_num_threads(int(num_threads))
        self.shard_id = shard_id
        if redis is not None and fingerprint is not None:
            assignments = _published_assignments(shard_id, redis, fingerprint) or assignments
        self.server = ExpertServer(shard_id, None, model_dir, dtype,
                                   {int(k): [(int(s), int(e)) for s, e in v] for k, v in assignments.items()},
                                   host=host, port=port, num_threads=num_threads,
                                   server_credentials=_credentials(tls),
                                   advertise_host=node_ip() if host in WILDCARD_HOSTS else None,
                                   device=device, matmul=cpu_matmul, deterministic=deterministic)

    def ready(self) -> bool:
        """True once the server listens with its slots loaded (``__init__`` has returned)."""
        return True

    def address(self) -> str:
        """``host:port`` of the shard's gRPC server (changes after a restart)."""
        return self.server.address

    def status(self) -> dict:
        """Slots held, weight bytes, RSS, pid, counters (see ``ExpertServer.status``)."""
        return self.server.status()

    def pid(self) -> int:
        return os.getpid()

    def stop(self, grace: float | None = None) -> None:
        """Stop the gRPC server (the actor stays; ``ray.kill`` ends it)."""
        self.server.stop(grace)

    def __ray_shutdown__(self) -> None:  # graceful actor exit
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(0)


def _credentials(tls: dict | None):
    """Mutual-TLS server credentials from a ``TLSSettings`` dict (``None``: plaintext)."""
    if not tls:
        return None
    return shard_server_credentials(TLSSettings.model_validate(tls))


def _published_assignments(shard_id: int, redis: dict, fingerprint: str) -> dict | None:
    """This shard's part of the placement in Redis, if one for ``fingerprint`` is there."""
    settings = RedisSettings.model_validate(redis)
    if not settings.enabled:
        return None
    try:
        client = connect(settings.model_copy(update={"socket_timeout_s": 1.0}))
        stored = read_placement(client, settings.key_prefix)
        client.close()
    except Exception as e:  # Redis down: the creation-time slots, reconciled later
        logging.getLogger("moeyard.shard").warning("shard %d: placement store unreachable (%s); loading the "
                                                   "slots it was created with", shard_id, type(e).__name__)
        return None
    if stored is None or stored.fingerprint != fingerprint or shard_id >= stored.placement.num_shards:
        return None
    return stored.placement.shard_slots(shard_id)


def create_shard_actor(shard_id: int, model_dir: str | Path, assignments: Mapping[int, Iterable[tuple[int, int]]],
                       dtype: str = "float32", host: str = "127.0.0.1", num_threads: int | None = None, *,
                       num_cpus: float = 1.0, use_gpu: bool = False, name: str | None = None,
                       namespace: str | None = None, detached: bool = False, max_task_retries: int = -1,
                       runtime_env: dict | None = None, redis: dict | None = None,
                       fingerprint: str | None = None, resources: dict[str, float] | None = None,
                       tls: dict | None = None, device: str = "auto", cpu_matmul: str = "auto",
                       deterministic: bool = False):
    """Start one :class:`ExpertShardActor`; returns its handle (``__init__`` runs asynchronously).

    Args:
        num_cpus: Ray CPUs reserved. ``num_threads`` defaults to ``max(1, round(num_cpus))``
            so the shard's torch threads match what Ray accounted for.
        use_gpu: reserve one GPU (``num_gpus=1``).
        device: where the shard computes (``auto``: the GPU Ray gave it, if any; see ``ExpertServer``).
        cpu_matmul: the CPU's matmul kernel for the experts (``moeyard.model.cpu_matmul``).
        deterministic: batch-invariant expert math (``moeyard.model.batch_invariant``).
        name / namespace: a named actor (``ray.get_actor(name, namespace=...)``).
        detached: ``lifetime="detached"`` (outlives the driver; needs ``name`` to be found again).
        redis / fingerprint: the cluster's ``RedisSettings`` (as a dict) and placement
            fingerprint: a (re)started actor loads its part of the published placement.
        resources: custom Ray resources to ask for (pins the actor to a node group).
        tls: ``moeyard.cluster.settings.tls.TLSSettings`` as a dict: mutual TLS on the shard's server when enabled.
        max_task_retries: retries of an actor method whose call was lost to a crash; every
            method is an idempotent read, so the default ``-1`` retries until the restarted
            actor answers (bound the wait with ``ray.get(..., timeout=...)``).
    """
    if num_threads is None:
        num_threads = max(1, round(num_cpus))
    opts: dict = dict(num_cpus=num_cpus, max_restarts=-1, max_task_retries=max_task_retries,
                      max_concurrency=4)
    if use_gpu:
        opts["num_gpus"] = 1
    if name is not None:
        opts["name"] = name
    if namespace is not None:
        opts["namespace"] = namespace
    if detached:
        opts["lifetime"] = "detached"
    if runtime_env is not None:
        opts["runtime_env"] = runtime_env
    if resources:
        opts["resources"] = dict(resources)
    cls = ray.remote(ExpertShardActor)
    assignments = {int(k): [(int(s), int(e)) for s, e in v] for k, v in assignments.items()}
    return cls.options(**opts).remote(shard_id, str(model_dir), assignments, dtype, host, num_threads,
                                      0, redis, fingerprint, tls, device, cpu_matmul, deterministic)
