"""The ``ShardManager`` deployment: creates the expert shard actors of the placement and reports on them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import ray
import torch
from ray import serve

from moeyard.cluster.control.placement_config import initial_placement, placement_fingerprint
from moeyard.cluster.control.placement_store import read_placement, write_placement
from moeyard.cluster.infra.redis_conn import check_reachable, connect
from moeyard.cluster.infra.telemetry import read_published
from moeyard.cluster.serving.common import (
    cluster_config,
    compute_dtype_name,
    pin,
    replica_id,
    shard_actor_name,
)
from moeyard.cluster.serving.shard_actor import create_shard_actor
from moeyard.model.spec import load_spec
from moeyard.router_service.placement import Placement

log = logging.getLogger("moeyard.serve")


@dataclass(frozen=True)
class PlacementInfo:
    """The placement in force, as the ShardManager answers it to the replicas, the autoscaler and the API."""

    phy2log: list[list[int]]
    """``[L][P]`` logical expert held by each physical slot."""
    num_shards: int
    epoch: int
    fingerprint: str
    """Identifies the deployment's placement (config and model); a stored placement of another is ignored."""

    @property
    def num_layers(self) -> int:
        return len(self.phy2log)

    @property
    def num_experts(self) -> int:
        return max(max(row) for row in self.phy2log) + 1

    def placement(self) -> Placement:
        return Placement(torch.tensor(self.phy2log), self.num_shards, self.epoch)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2)
class ShardManager:
    """Creates the expert shard actors of the placement and reports on them."""

    async def __init__(self, cfg: dict):
        self.cfg = cluster_config(cfg)
        self.spec = load_spec(self.cfg.model_dir())
        self.owner_id = f"{replica_id()}-{time.time_ns()}"
        self.actors = []
        self.placement = None
        self.fingerprint = None
        self.redis = None
        if self.spec.moe is None:  # dense baseline: no routed experts, no shards
            return
        placement = initial_placement(self.cfg, self.spec)
        self.fingerprint = placement_fingerprint(self.cfg, self.spec, placement)
        recovered = False
        if self.cfg.redis.enabled:
            placement, recovered = await asyncio.to_thread(self._recover_or_publish, placement)
        self.placement = placement
        for shard in range(placement.num_shards):
            name = shard_actor_name(self.cfg, shard)
            actor = await asyncio.to_thread(_live_actor, name, self.cfg.namespace) if recovered else None
            if actor is None:
                _kill_named(name, self.cfg.namespace)  # stale shard of an earlier deploy
                actor = self._create_shard(shard, placement.shard_slots(shard))
            self.actors.append(actor)
        await asyncio.wait_for(asyncio.gather(*[a.ready.remote() for a in self.actors]), timeout=300)
        if self.redis is not None:  # the shards are ours now (a manager of an earlier deploy leaves them be)
            await asyncio.to_thread(self.redis.set, owner_key(self.cfg.redis.key_prefix), self.owner_id)
        log.info("%d expert shards ready (placement epoch %d%s)", len(self.actors), placement.epoch,
                 ", recovered from Redis" if recovered else "")

    def _create_shard(self, shard: int, assignments: dict):
        c = self.cfg
        return create_shard_actor(
            shard, str(c.model_dir()), assignments, compute_dtype_name(c, self.spec), host=c.shard_host,
            num_threads=c.torch_threads, num_cpus=c.shard_num_cpus, use_gpu=c.use_gpu, device=c.device,
            name=shard_actor_name(c, shard), namespace=c.namespace, detached=True,
            redis=c.redis.model_dump(mode="json"), fingerprint=self.fingerprint,
            resources=pin(c.ray_resources.experts), tls=c.tls.model_dump(mode="json"), cpu_matmul=c.cpu_matmul,
            deterministic=c.deterministic)

    def _recover_or_publish(self, initial):
        """The placement in Redis if it is for this deployment (a restarted manager, a redeploy
        with the same config), else ``initial`` published under a newer epoch."""
        check_reachable(self.cfg.redis)
        self.redis = connect(self.cfg.redis)
        prefix = self.cfg.redis.key_prefix
        stored = read_placement(self.redis, prefix)
        if stored is not None and stored.fingerprint == self.fingerprint:
            return stored.placement, True
        epoch = stored.placement.epoch + 1 if stored is not None else 0
        placement = Placement(initial.phy2log, initial.num_shards, epoch)
        write_placement(self.redis, prefix, placement, self.fingerprint)
        return placement, False

    async def __del__(self):
        """Graceful shutdown (``serve.delete``, a redeploy): once the attention replicas have drained
        (bounded by ``drain_timeout_s``), the shards go with the app, unless a newer manager has
        adopted them (a redeploy with the same placement fingerprint reuses the live shards)."""
        actors = getattr(self, "actors", [])
        if not actors:
            return
        if self.redis is not None:
            try:
                owner = await asyncio.to_thread(self.redis.get, owner_key(self.cfg.redis.key_prefix))
                if owner is not None and owner.decode() != self.owner_id:
                    log.info("expert shards adopted by a newer shard manager: leaving them running")
                    return
                await asyncio.to_thread(wait_replicas_drained, self.redis, self.cfg.redis.key_prefix,
                                        self.cfg.drain_timeout_s)
            except Exception as e:  # Redis gone: nothing to wait on
                log.warning("could not check the replicas' drain (%s)", type(e).__name__)
        for actor in actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                log.debug("shard actor already gone")

    async def placement_info(self) -> PlacementInfo | None:
        """The placement in force (Redis's when there is one: the autoscaler moves it); None for a dense model."""
        p = self.placement
        if p is None:
            return None
        if self.redis is not None:
            try:
                stored = await asyncio.to_thread(read_placement, self.redis, self.cfg.redis.key_prefix)
                if stored is not None and stored.fingerprint == self.fingerprint:
                    p = stored.placement
            except Exception as e:  # Redis down: what we started with
                log.warning("placement store unreachable (%s)", type(e).__name__)
        return PlacementInfo(p.phy2log.tolist(), p.num_shards, p.epoch, self.fingerprint)

    async def num_shards(self) -> int:
        return len(self.actors)

    async def add_shard(self, shard_id: int, assignments: dict) -> str:
        """Start shard ``shard_id`` (the autoscaler scaling up) holding ``assignments``; returns its address."""
        if shard_id != len(self.actors):
            raise ValueError(f"shards are added at the end: next is {len(self.actors)}, not {shard_id}")
        await asyncio.to_thread(_kill_named, shard_actor_name(self.cfg, shard_id), self.cfg.namespace)
        actor = self._create_shard(shard_id, {int(k): v for k, v in assignments.items()})
        await asyncio.wait_for(actor.ready.remote(), timeout=300)
        self.actors.append(actor)
        log.info("expert shard %d added", shard_id)
        return await actor.address.remote()

    async def remove_shard(self, shard_id: int) -> None:
        """Stop the last shard (the autoscaler scaling down, after routers left it)."""
        if shard_id != len(self.actors) - 1:
            raise ValueError(f"only the last shard ({len(self.actors) - 1}) can be removed, not {shard_id}")
        actor = self.actors.pop()
        ray.kill(actor, no_restart=True)
        log.info("expert shard %d removed", shard_id)

    async def addresses(self) -> dict[int, str]:
        addrs = await asyncio.gather(*[a.address.remote() for a in self.actors])
        return dict(enumerate(addrs))

    async def status(self) -> list[dict]:
        out = []
        for shard, actor in enumerate(self.actors):
            try:
                st = await asyncio.wait_for(actor.status.remote(), timeout=10)
                st["healthy"] = True
            except Exception as e:  # a dead or restarting shard is reported, not raised
                st = {"shard_id": shard, "healthy": False, "error": f"{type(e).__name__}: {e}"}
            out.append(st)
        return out


def owner_key(prefix: str) -> str:
    """Redis key naming the shard manager that owns the live shard actors."""
    return f"{prefix}:shards:owner"


def wait_replicas_drained(client, prefix: str, timeout_s: float, poll_s: float = 0.2) -> bool:
    """Wait until no attention replica reports a running or waiting request (their telemetry
    in Redis; a replica that stopped has removed its key). Returns False at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [p.source for p in read_published(client, prefix, "replica")
                if p.summary.get("running", 0) or p.summary.get("waiting", 0)]
        if not busy:
            return True
        if time.monotonic() >= deadline:
            log.warning("replicas %s still busy after %.0f s: stopping the shards anyway", busy, timeout_s)
            return False
        time.sleep(poll_s)


def _live_actor(name: str, namespace: str):
    """The named actor if it exists and answers within a few seconds, else ``None``."""
    try:
        actor = ray.get_actor(name, namespace=namespace)
        ray.get(actor.ready.remote(), timeout=10)
        return actor
    except Exception:
        return None


def _kill_named(name: str, namespace: str) -> None:
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the name is released once the actor is dead
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)
