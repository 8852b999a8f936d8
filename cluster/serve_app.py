"""The moeyard Ray Serve application.

One application, built from a :class:`~cluster.config.ClusterConfig`, creates
everything: the expert shards (Ray actors with their own gRPC servers, created
by the ``ShardManager`` deployment), the attention replicas (``AttentionReplica``,
each an engine with its own router reaching every shard over gRPC, counting
expert load into Redis and following the published placement), the
``Autoscaler`` (rebalances live, reconciles shards) and the public gRPC API
(``ApiIngress``, which picks a replica per request through a Serve handle:
least loaded of two random choices).
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
        from cluster.placement_config import initial_placement, placement_fingerprint
        from cluster.spec import load_spec

        self.cfg = _cfg(cfg)
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
        dtype = _dtype_name(self.cfg, self.spec)
        for shard in range(placement.num_shards):
            name = shard_actor_name(self.cfg, shard)
            actor = await asyncio.to_thread(_live_actor, name, self.cfg.namespace) if recovered else None
            if actor is None:
                _kill_named(name, self.cfg.namespace)  # stale shard of an earlier deploy
                actor = self._create_shard(shard, dtype)
            self.actors.append(actor)
        await asyncio.wait_for(asyncio.gather(*[a.ready.remote() for a in self.actors]), timeout=300)
        if self.redis is not None:  # the shards are ours now (a manager of an earlier deploy leaves them be)
            await asyncio.to_thread(self.redis.set, owner_key(self.cfg.redis.key_prefix), self.owner_id)
        log.info("%d expert shards ready (placement epoch %d%s)", len(self.actors), placement.epoch,
                 ", recovered from Redis" if recovered else "")

    def _create_shard(self, shard: int, dtype: str):
        from expert_actors.shard_actor import create_shard_actor

        c = self.cfg
        return create_shard_actor(
            shard, str(c.model_dir()), self.placement.shard_slots(shard), dtype, host=c.shard_host,
            num_threads=c.torch_threads, num_cpus=c.shard_num_cpus, use_gpu=c.use_gpu,
            name=shard_actor_name(c, shard), namespace=c.namespace, detached=True,
            redis=c.redis.model_dump(mode="json"), fingerprint=self.fingerprint,
            resources=_pin(c.ray_resources.experts), tls=c.tls.model_dump(mode="json"))

    def _recover_or_publish(self, initial):
        """The placement in Redis if it is for this deployment (a restarted manager, a redeploy
        with the same config), else ``initial`` published under a newer epoch."""
        from cluster.placement_store import read_placement, write_placement
        from cluster.redis_conn import check_reachable, connect
        from router_service.placement import Placement

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

    async def placement_info(self) -> dict | None:
        """The placement in force (Redis's when there is one: the autoscaler moves it)."""
        p = self.placement
        if p is None:
            return None
        if self.redis is not None:
            from cluster.placement_store import read_placement

            try:
                stored = await asyncio.to_thread(read_placement, self.redis, self.cfg.redis.key_prefix)
                if stored is not None and stored.fingerprint == self.fingerprint:
                    p = stored.placement
            except Exception as e:  # Redis down: what we started with
                log.warning("placement store unreachable (%s)", type(e).__name__)
        return {"phy2log": p.phy2log.tolist(), "num_shards": p.num_shards, "epoch": p.epoch,
                "fingerprint": self.fingerprint}

    async def num_shards(self) -> int:
        return len(self.actors)

    async def add_shard(self, shard_id: int, assignments: dict) -> str:
        """Start shard ``shard_id`` (the autoscaler scaling up) holding ``assignments``; returns its address."""
        from expert_actors.shard_actor import create_shard_actor

        if shard_id != len(self.actors):
            raise ValueError(f"shards are added at the end: next is {len(self.actors)}, not {shard_id}")
        c = self.cfg
        name = shard_actor_name(c, shard_id)
        await asyncio.to_thread(_kill_named, name, c.namespace)
        actor = create_shard_actor(
            shard_id, str(c.model_dir()), {int(k): v for k, v in assignments.items()},
            _dtype_name(c, self.spec), host=c.shard_host, num_threads=c.torch_threads, num_cpus=c.shard_num_cpus,
            use_gpu=c.use_gpu, name=name, namespace=c.namespace, detached=True,
            redis=c.redis.model_dump(mode="json"), fingerprint=self.fingerprint,
            resources=_pin(c.ray_resources.experts), tls=c.tls.model_dump(mode="json"))
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
    from cluster.telemetry import read_published

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

            self.transport = GrpcTransport(address, wire_dtype=wire, **_internal_tls(c))
        e = c.engine
        engine = LLMEngine(c.model_dir(), EngineConfig(
            dtype=c.dtype, block_size=e.block_size, kv_cache_bytes=e.kv_cache_mib << 20, max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens, max_model_len=e.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching, overlap=c.overlap, overlap_mode=c.overlap_mode,
            expert_restart_wait_s=c.shard_restart_wait_s),
            transport=self.transport, placement=placement)
        self.engine = AsyncEngine(engine, max_waiting=e.max_waiting)
        self.pusher = None  # SinkPusher, made on first use (on this replica's event loop)
        self.replica_id = replica_id()
        self.flusher = self.follower = self.telemetry = None
        from cluster.replica_metrics import ReplicaMetrics

        self.metrics = ReplicaMetrics(per_expert=c.dashboard.per_expert_metrics)
        if c.redis.enabled:
            if placement is not None:
                self._start_load_stats(engine, placement)
            self._start_telemetry()

    def _start_load_stats(self, engine, placement) -> None:
        """Count tokens per expert and slot, flush them to Redis, follow the published placement."""
        from cluster.load_store import LoadFlusher
        from cluster.redis_conn import connect
        from router_service.load_recorder import LoadRecorder
        from router_service.placement_follower import PlacementFollower

        c = self.cfg
        client = connect(c.redis)
        dispatcher = engine.router.dispatcher
        dispatcher.recorder = LoadRecorder(placement.num_layers, placement.num_experts, placement.num_slots)
        self.flusher = LoadFlusher(dispatcher.recorder, lambda: client, c.redis, self.replica_id,
                                   epoch_fn=lambda: (dispatcher.placement.epoch, dispatcher.placement.num_slots),
                                   on_snapshot=lambda snap: self.metrics.expert_load(
                                       snap, dispatcher.placement.num_shards))
        self.flusher.start()
        self.follower = PlacementFollower(dispatcher, client, c.redis.key_prefix, self.replica_id,
                                          placement.num_layers, placement.num_experts)
        dispatcher.on_stale = self.follower.refresh
        self.follower.start()

    def _start_telemetry(self) -> None:
        """Publish this replica's metrics and recent serving figures to Redis (for the dashboard)."""
        from cluster.redis_conn import connect
        from cluster.telemetry import TelemetryPublisher

        client = connect(self.cfg.redis)
        self.telemetry = TelemetryPublisher(
            lambda: client, self.cfg.redis.key_prefix, "replica", self.replica_id, self.metrics.registry,
            summary_fn=self._summary, interval_s=self.cfg.dashboard.telemetry_interval_s,
            before_publish=self._refresh_gauges).start()

    def _epoch(self) -> int | None:
        router = self.engine.engine.router
        return router.dispatcher.placement.epoch if router is not None and self.transport is not None else None

    def _refresh_gauges(self) -> None:
        s = self.engine.stats()
        f = self.flusher.stats() if self.flusher is not None else None
        self.metrics.engine_state(s.running, s.waiting, s.kv_cache_usage, self._epoch(),
                                  f.flushes_failed if f else 0, f.tokens_dropped if f else 0)

    def _summary(self) -> dict:
        s = self.engine.stats()
        return {"running": s.running, "waiting": s.waiting, "kv_cache_usage": s.kv_cache_usage,
                "num_blocks": s.num_blocks, "placement_epoch": self._epoch(), **self.metrics.summary()}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: dict, sink: dict | None = None):
        """Stream dicts: new ``token_ids`` (output tokens from ``offset`` on) per step, ``finish_reason``
        on the last; or one ``error`` dict (``invalid_argument`` | ``resource_exhausted`` | ``unavailable``).

        With ``sink`` (the ingress's :class:`~cluster.output_sink.SinkSpec` as a dict) the per-step
        deltas go to that sink, batched with the other requests of the step, and the Serve stream
        carries only the last item, whose ``output_token_ids`` lists every output token (so the
        ingress fills in anything the sink did not deliver); while the sink is unreachable the
        deltas come on the Serve stream as without it.
        """
        from attention.async_engine import EngineFailed, QueueFull
        from attention.sequence import RequestError, SamplingParams

        from cluster.output_sink import SinkSpec
        from cluster.replica_metrics import RequestTimer

        timer, m, done = RequestTimer(), self.metrics, False
        target, key = SinkSpec.from_dict(sink) or (None, None)
        produced: list[int] = []
        try:
            sp = SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
            async for out in self.engine.generate(request_id, prompt_token_ids, sp):
                m.tokens(timer, len(out.new_token_ids))
                offset = len(produced)
                produced.extend(out.new_token_ids)
                new = out.new_token_ids
                if out.finished:
                    done = True
                    m.finished(timer, out.finish_reason, out.num_prompt_tokens)
                elif target is not None:
                    if self._sink_pusher().push(target, key, offset, new):
                        continue
                    # the sink is unreachable (deltas it was sent may be lost): the rest of this request
                    # goes on the Serve call, starting with every token so far
                    target, offset, new = None, 0, list(produced)
                item = {"token_ids": new, "offset": offset, "finished": out.finished,
                        "finish_reason": out.finish_reason, "prompt_tokens": out.num_prompt_tokens,
                        "completion_tokens": out.num_output_tokens}
                if out.finished and sink is not None:
                    item["output_token_ids"] = produced
                yield item
        except (RequestError, TypeError) as e:
            done = True
            m.failed("invalid_argument")
            yield {"error": "invalid_argument", "message": str(e)}
        except QueueFull as e:
            done = True
            m.failed("resource_exhausted")
            yield {"error": "resource_exhausted", "message": str(e)}
        except EngineFailed as e:
            done = True
            m.failed("unavailable")
            yield {"error": "unavailable", "message": str(e)}
        finally:
            if not done:  # the caller went away (cancelled, deadline) before the last token
                m.failed("aborted")

    def _sink_pusher(self):
        if self.pusher is None:
            from cluster.output_sink import SinkPusher

            tls = _internal_tls(self.cfg)
            self.pusher = SinkPusher(tls.get("channel_credentials"), tls.get("channel_options"))
        return self.pusher

    async def stats(self) -> dict:
        from dataclasses import asdict

        s = self.engine.stats()
        out = {"replica": self.replica_id, "running": s.running, "waiting": s.waiting,
               "kv_cache_usage": s.kv_cache_usage, "num_blocks": s.num_blocks}
        if self.flusher is not None:
            out["load_stats"] = asdict(self.flusher.stats())
            out["placement_epoch"] = self.engine.engine.router.dispatcher.placement.epoch
            out["placement_follower"] = asdict(self.follower.stats)
        return out

    def __del__(self):
        for part in ("telemetry", "follower", "flusher"):
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.stop()
                except Exception:
                    pass
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class _ServeShardFactory:
    """:class:`cluster.autoscaler.ShardFactory` through the ShardManager deployment."""

    def __init__(self, shard_manager):
        self.shard_manager = shard_manager

    def create(self, shard_id: int, assignments: dict[int, list[tuple[int, int]]]) -> None:
        self.shard_manager.add_shard.remote(shard_id, assignments).result(timeout_s=600)

    def remove(self, shard_id: int) -> None:
        self.shard_manager.remove_shard.remote(shard_id).result(timeout_s=120)


def replica_id() -> str:
    """This process's id in Redis keys (letters, digits, ``_.-``)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getpid()}")[:60]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2)
class Autoscaler:
    """Reads the load windows, rebalances live and reconciles shards (see ``cluster.autoscaler``)."""

    async def __init__(self, cfg: dict, shard_manager):
        import threading

        self.cfg = c = _cfg(cfg)
        self.core = None
        self._stop = threading.Event()
        info = await shard_manager.placement_info.remote()
        if info is None or not c.redis.enabled:
            log.info("autoscaler off: %s", "dense model" if info is None else "no Redis configured")
            return
        from cluster.autoscaler import AutoscalerCore, LoadView
        from cluster.load_store import read_load, smooth
        from cluster.migration import GrpcShardControl
        from cluster.redis_conn import connect
        from router_service.grpc_transport import GrpcTransport

        client = connect(c.redis)
        prefix = c.redis.key_prefix
        L, P = len(info["phy2log"]), len(info["phy2log"][0])
        E = max(max(r) for r in info["phy2log"]) + 1
        self.transport = GrpcTransport(_resolver(c), **_internal_tls(c))
        half_life = c.autoscaler.half_life_windows

        def load_reader(since_s: float) -> LoadView:
            w = read_load(client, prefix, since_s)
            if w.num_windows == 0:
                return LoadView(torch.zeros(L, E, dtype=torch.float64), 0.0)
            span = w.num_windows * (w.window_s or c.redis.window_s)
            return LoadView(smooth(w.expert_counts.to(torch.float64), half_life),
                            float(w.expert_counts.sum()) / span)

        factory = _ServeShardFactory(shard_manager) if c.autoscaler.min_shards is not None else None
        self.core = AutoscalerCore(c.autoscaler, client, prefix, info["fingerprint"],
                                   GrpcShardControl(self.transport), load_reader, L, E, factory)
        from cluster.autoscaler_metrics import AutoscalerMetrics
        from cluster.telemetry import TelemetryPublisher

        self.metrics = AutoscalerMetrics()
        self.core.event_hooks.append(self.metrics.observe)
        self.telemetry = TelemetryPublisher(lambda: client, prefix, "autoscaler", "0", self.metrics.registry,
                                            interval_s=c.dashboard.telemetry_interval_s).start()
        self._thread = threading.Thread(target=self._loop, name="autoscaler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.autoscaler.interval_s):
            self.core.loop_once()

    async def rebalance(self) -> dict:
        """Plan and apply a placement now (``moeyard rebalance``)."""
        from cluster.autoscaler import result_dict

        if self.core is None:
            raise RuntimeError("the autoscaler is off (dense model or no Redis configured)")
        return result_dict(await asyncio.to_thread(self.core.rebalance))

    async def events(self, limit: int = 50) -> list[dict]:
        from cluster.placement_store import read_events

        if self.core is None:
            return []
        return await asyncio.to_thread(read_events, self.core.client, self.core.prefix, limit)

    def __del__(self):
        self._stop.set()
        telemetry = getattr(self, "telemetry", None)
        if telemetry is not None:
            telemetry.stop()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2)
class Dashboard:
    """The operator dashboard and ``/metrics`` on their own port (see ``cluster.dashboard``)."""

    async def __init__(self, cfg: dict, shard_manager):
        from cluster.dashboard.collect import DashboardSource
        from cluster.dashboard.server import DashboardServer
        from cluster.economics import economics

        self.cfg = c = _cfg(cfg)
        self.server = None
        if not c.dashboard.enabled:
            return
        token = None
        if c.require_auth:
            token = os.environ.get("MOEYARD_API_TOKEN") if c.dashboard.token_file is None else None
            token = token or _read_token_file(c.dashboard_token_file())
        client = None
        if c.redis.enabled:
            from cluster.redis_conn import connect

            client = connect(c.redis)
        try:
            econ = await asyncio.to_thread(economics, c.model_dir())
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


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, health_check_period_s=2,
                  graceful_shutdown_timeout_s=30)
class ApiIngress:
    """The public gRPC API (moeyard.v1.Inference, health, reflection)."""

    async def __init__(self, cfg: dict, replicas, shard_manager, autoscaler=None, dashboard=None):
        from attention.tokenizer import load_tokenizer
        from cluster.api_server import serve_api
        from cluster.serve_backend import ServeBackend
        from cluster.spec import load_spec

        self.cfg = c = _cfg(cfg)
        spec = load_spec(c.model_dir())
        token = None
        if c.require_auth:
            token = os.environ.get("MOEYARD_API_TOKEN") or _read_token(c)
        self.sink = None
        if c.output_sink:
            from cluster.output_sink import OutputSink
            from cluster.tls import shard_server_credentials

            self.sink = OutputSink(c.shard_host, shard_server_credentials(c.tls))
            await self.sink.start()
        backend = ServeBackend(replicas, shard_manager, spec, c, sink=self.sink)
        self.autoscaler = autoscaler
        self.dashboard = dashboard
        from cluster.tls import api_server_credentials

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

    async def output_sink_stats(self) -> dict | None:
        """The output sink's address and counters (batches, deltas, dropped), and the API address of
        this ingress; None when the sink is off."""
        sink = self.sink
        if sink is None:
            return None
        return {"address": sink.address, "batches": sink.batches, "deltas": sink.deltas, "dropped": sink.dropped,
                "api_address": self.server.address if self.server is not None else None}

    async def dashboard_address(self) -> str | None:
        """The dashboard's URL (``http://host:port/``), None when it is off."""
        return await self.dashboard.address.remote() if self.dashboard is not None else None

    async def check_health(self):
        if self.server is None:
            raise RuntimeError("API server not running")


def _read_token(cfg: ClusterConfig) -> str:
    return _read_token_file(cfg.token_file())


def _read_token_file(path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise RuntimeError(f"API token file {path} cannot be read ({e.strerror}); "
                           "set require_auth: false to run without authentication") from None
    if not token:
        raise RuntimeError(f"API token file {path} is empty")
    return token


def _internal_tls(cfg: ClusterConfig) -> dict:
    """GrpcTransport keyword arguments for mutual TLS towards the shards (empty: plaintext)."""
    from cluster.tls import router_channel_credentials, router_channel_options

    if not cfg.tls.internal_enabled:
        return {}
    return {"channel_credentials": router_channel_credentials(cfg.tls),
            "channel_options": router_channel_options(cfg.tls)}


def _pin(resource: str | None) -> dict[str, float] | None:
    """A token amount of a custom resource: enough to keep an actor on the nodes that have it."""
    return {resource: 0.001} if resource else None


def _actor_options(num_cpus: float, resource: str | None) -> dict:
    opts: dict = {"num_cpus": num_cpus}
    if resource:
        opts["resources"] = _pin(resource)
    return opts


def build_app(cfg: ClusterConfig | dict):
    """The Serve application for ``cfg`` (``serve.run(build_app(cfg), name=APP_NAME)``)."""
    c = cfg if isinstance(cfg, ClusterConfig) else _cfg(cfg)
    d = c.model_dump(mode="json")
    control = _actor_options(0, c.ray_resources.control)  # 0 CPUs: the control plane never blocks scaling
    shards = ShardManager.options(ray_actor_options=control, graceful_shutdown_timeout_s=c.drain_timeout_s + 20).bind(d)
    e = c.engine
    replicas = AttentionReplica.options(
        num_replicas=c.attention_replicas,
        max_ongoing_requests=e.max_num_seqs + e.max_waiting + 8,
        ray_actor_options=_actor_options(c.replica_num_cpus, c.ray_resources.attention),
        graceful_shutdown_timeout_s=c.drain_timeout_s + 10).bind(d, shards)
    autoscaler = Autoscaler.options(ray_actor_options=control).bind(d, shards)
    dashboard = Dashboard.options(ray_actor_options=control).bind(d, shards)
    ingress = ApiIngress.options(ray_actor_options=control, graceful_shutdown_timeout_s=c.drain_timeout_s + 10)
    return ingress.bind(d, replicas, shards, autoscaler, dashboard)


def app_builder(args: dict):
    """Entry point for ``serveConfigV2`` (``import_path: cluster.serve_app:app_builder``)."""
    return build_app(ClusterConfig.model_validate(args))
