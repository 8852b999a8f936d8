"""The moeyard Ray Serve application.

One application, built from a :class:`~cluster.config.ClusterConfig`, creates
everything: the expert shards (Ray actors with their own gRPC servers, created
by the ``ShardManager`` deployment), the attention replicas (``AttentionReplica``,
each an engine with its own router reaching every shard over gRPC) and the
public gRPC API (``ApiIngress``, which picks a replica per request through a
Serve handle: least loaded of two random choices).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import ray
import torch
from ray import serve

from cluster.config import ClusterConfig

log = logging.getLogger("moeyard.serve")

APP_NAME = "moeyard"


def shard_actor_name(cfg: ClusterConfig, shard: int) -> str:
    return f"{cfg.namespace}-shard-{shard}"


def _cfg(d: dict) -> ClusterConfig:
    return ClusterConfig.model_validate(d)


def _dtype_name(cfg: ClusterConfig, spec) -> str:
    from attention.engine import resolve_dtype

    return "bfloat16" if resolve_dtype(cfg.dtype, spec) == torch.bfloat16 else "float32"


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2)
class ShardManager:
    """Creates the expert shard actors of the placement and reports on them."""

    async def __init__(self, cfg: dict):
        from cluster.placement_config import initial_placement
        from cluster.spec import load_spec
        from expert_actors.shard_actor import create_shard_actor

        self.cfg = _cfg(cfg)
        self.spec = load_spec(self.cfg.model_dir())
        self.actors = []
        self.placement = None
        if self.spec.moe is None:  # dense baseline: no routed experts, no shards
            return
        self.placement = initial_placement(self.cfg, self.spec)
        dtype = _dtype_name(self.cfg, self.spec)
        for shard in range(self.placement.num_shards):
            _kill_named(shard_actor_name(self.cfg, shard), self.cfg.namespace)  # stale shard of an earlier deploy
            self.actors.append(create_shard_actor(
                shard, str(self.cfg.model_dir()), self.placement.shard_slots(shard), dtype,
                host="127.0.0.1", num_threads=self.cfg.torch_threads, num_cpus=self.cfg.shard_num_cpus,
                use_gpu=self.cfg.use_gpu, name=shard_actor_name(self.cfg, shard), namespace=self.cfg.namespace,
                detached=True))
        await asyncio.wait_for(asyncio.gather(*[a.ready.remote() for a in self.actors]), timeout=300)
        log.info("%d expert shards ready", len(self.actors))

    def __del__(self):
        # graceful shutdown of the app (serve.delete, redeploy): the shards go with it
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass

    async def placement_info(self) -> dict | None:
        p = self.placement
        if p is None:
            return None
        return {"phy2log": p.phy2log.tolist(), "num_shards": p.num_shards, "epoch": p.epoch}

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


def _resolver(cfg: ClusterConfig):
    """Shard address lookup for the transport. Runs on the router's thread, so it is
    quick: a shard that is restarting fails the lookup (the transport reports it
    unavailable and the dispatcher uses other copies) rather than stalling every request."""
    def resolve(shard: int) -> str:
        actor = ray.get_actor(shard_actor_name(cfg, shard), namespace=cfg.namespace)
        return ray.get(actor.address.remote(), timeout=3)
    return resolve


@serve.deployment(health_check_period_s=2, graceful_shutdown_timeout_s=30)
class AttentionReplica:
    """An attention engine whose router reaches every expert shard over gRPC."""

    async def __init__(self, cfg: dict, shard_manager):
        from attention.async_engine import AsyncEngine
        from attention.engine import EngineConfig, LLMEngine
        from router_service.grpc_transport import GrpcTransport
        from router_service.placement import Placement

        self.cfg = c = _cfg(cfg)
        torch.set_num_threads(c.torch_threads)
        info = await shard_manager.placement_info.remote()
        self.transport = placement = None
        if info is not None:
            addrs = await shard_manager.addresses.remote()
            placement = Placement(torch.tensor(info["phy2log"]), info["num_shards"], info["epoch"])
            wire = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[c.wire_dtype]
            resolve = _resolver(c)
            known = {int(k): v for k, v in addrs.items()}

            def address(shard: int) -> str:
                addr = known.pop(shard, None)  # first use: the address we were given; later: ask the actor
                return addr or resolve(shard)

            self.transport = GrpcTransport(address, wire_dtype=wire)
        e = c.engine
        engine = LLMEngine(c.model_dir(), EngineConfig(
            dtype=c.dtype, block_size=e.block_size, kv_cache_bytes=e.kv_cache_mib << 20, max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens, max_model_len=e.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching, overlap=c.overlap),
            transport=self.transport, placement=placement)
        self.engine = AsyncEngine(engine, max_waiting=e.max_waiting)
        self.replica_id = os.getpid()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict):
        """Stream dicts: new ``token_ids`` per step, ``finish_reason`` on the last;
        or one ``error`` dict (``invalid_argument`` | ``resource_exhausted`` | ``unavailable``)."""
        from attention.async_engine import EngineFailed, QueueFull
        from attention.sequence import RequestError, SamplingParams

        try:
            sp = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
            async for out in self.engine.generate(request_id, prompt_token_ids, sp):
                yield {"token_ids": out.new_token_ids, "finished": out.finished,
                       "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                       "completion_tokens": out.num_output_tokens}
        except (RequestError, TypeError) as e:
            yield {"error": "invalid_argument", "message": str(e)}
        except QueueFull as e:
            yield {"error": "resource_exhausted", "message": str(e)}
        except EngineFailed as e:
            yield {"error": "unavailable", "message": str(e)}

    async def stats(self) -> dict:
        s = self.engine.stats()
        return {"replica": self.replica_id, "running": s.running, "waiting": s.waiting,
                "kv_cache_usage": s.kv_cache_usage, "num_blocks": s.num_blocks}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2,
                  graceful_shutdown_timeout_s=30)
class ApiIngress:
    """The public gRPC API (moeyard.v1.Inference, health, reflection)."""

    async def __init__(self, cfg: dict, replicas, shard_manager):
        from attention.tokenizer import load_tokenizer
        from cluster.api_server import serve_api
        from cluster.serve_backend import ServeBackend
        from cluster.spec import load_spec

        self.cfg = c = _cfg(cfg)
        spec = load_spec(c.model_dir())
        token = None
        if c.require_auth:
            token = os.environ.get("MOEYARD_API_TOKEN") or _read_token(c)
        backend = ServeBackend(replicas, shard_manager, spec, c)
        self.server = await serve_api(backend, load_tokenizer(c.model_dir()), host=c.api_host, port=c.api_port,
                                      auth_token=token, require_auth=c.require_auth,
                                      max_new_tokens_limit=c.engine.max_new_tokens_limit)

    async def address(self) -> str:
        return self.server.address

    async def check_health(self):
        if self.server is None:
            raise RuntimeError("API server not running")


def _read_token(cfg: ClusterConfig) -> str:
    path = cfg.token_file()
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise RuntimeError(f"API token file {path} cannot be read ({e.strerror}); "
                           "set require_auth: false to run without authentication") from None
    if not token:
        raise RuntimeError(f"API token file {path} is empty")
    return token


def build_app(cfg: ClusterConfig | dict):
    """The Serve application for ``cfg`` (``serve.run(build_app(cfg), name=APP_NAME)``)."""
    c = cfg if isinstance(cfg, ClusterConfig) else _cfg(cfg)
    d = c.model_dump(mode="json")
    shards = ShardManager.bind(d)
    e = c.engine
    replicas = AttentionReplica.options(
        num_replicas=c.attention_replicas,
        max_ongoing_requests=e.max_num_seqs + e.max_waiting + 8,
        ray_actor_options={"num_cpus": c.replica_num_cpus}).bind(d, shards)
    return ApiIngress.bind(d, replicas, shards)


def app_builder(args: dict):
    """Entry point for ``serveConfigV2`` (``import_path: cluster.serve_app:app_builder``)."""
    return build_app(ClusterConfig.model_validate(args))
