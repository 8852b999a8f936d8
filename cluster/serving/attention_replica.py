"""The ``AttentionReplica`` deployment: an attention engine whose router reaches every expert shard over gRPC,
counts expert load into Redis and follows the published placement."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import asdict

import torch
from ray import serve

from moeyard.attention.async_engine import AsyncEngine, EngineFailed, QueueFull
from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import RequestError, SamplingParams
from moeyard.cluster.control.load_store import LoadFlusher
from moeyard.cluster.control.placement_follower import PlacementFollower
from moeyard.cluster.infra.redis_conn import connect
from moeyard.cluster.infra.telemetry import TelemetryPublisher
from moeyard.cluster.serving.common import cluster_config, internal_tls, replica_id, shard_resolver
from moeyard.cluster.serving.output_sink import SinkPusher, SinkTarget
from moeyard.cluster.serving.replica_metrics import ReplicaMetrics, RequestTimer
from moeyard.cluster.serving.replica_stream import StepTokens, StreamError, StreamItem
from moeyard.router_service.grpc_transport import GrpcTransport
from moeyard.router_service.load_recorder import LoadRecorder

log = logging.getLogger("moeyard.serve")

_WIRE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


@serve.deployment(health_check_period_s=2, graceful_shutdown_timeout_s=30)
class AttentionReplica:
    """An attention engine whose router reaches every expert shard over gRPC."""

    async def __init__(self, cfg: dict, shard_manager):
        self.cfg = c = cluster_config(cfg)
        torch.set_num_threads(c.torch_threads)
        info = await shard_manager.placement_info.remote()
        self.transport = placement = None
        if info is not None:
            addrs = await shard_manager.addresses.remote()
            placement = info.placement()
            resolve = shard_resolver(c)
            known = {int(k): v for k, v in addrs.items()}

            def address(shard: int) -> str:
                addr = known.pop(shard, None)  # first use: the address we were given; later: ask the actor
                return addr or resolve(shard)

            self.transport = GrpcTransport(address, wire_dtype=_WIRE_DTYPES[c.wire_dtype], **internal_tls(c))
        e = c.engine
        engine = LLMEngine(c.model_dir(), EngineConfig(
            dtype=c.dtype, device=c.device, block_size=e.block_size, kv_cache_bytes=e.kv_cache_mib << 20,
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens, max_model_len=e.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching, attention_backend=e.attention_backend,
            overlap=c.overlap, overlap_mode=c.overlap_mode,
            expert_restart_wait_s=c.shard_restart_wait_s, cpu_matmul=c.cpu_matmul, deterministic=c.deterministic,
            top_k_override=c.moe_top_k, capacity_factor=c.capacity_factor, overflow=c.overflow),
            transport=self.transport, placement=placement)
        self.engine = AsyncEngine(engine, max_waiting=e.max_waiting)
        self.pusher = None  # SinkPusher, made on first use (on this replica's event loop)
        self.replica_id = replica_id()
        self.flusher = self.follower = self.telemetry = None
        self.metrics = ReplicaMetrics(per_expert=c.dashboard.per_expert_metrics)
        if c.redis.enabled:
            if placement is not None:
                self._start_load_stats(engine, placement)
            self._start_telemetry()

    def _start_load_stats(self, engine, placement) -> None:
        """Count tokens per expert and slot, flush them to Redis, follow the published placement."""
        c = self.cfg
        client = connect(c.redis)
        dispatcher = engine.router.dispatcher
        dispatcher.recorder = LoadRecorder(placement.num_layers, placement.num_experts, placement.num_slots,
                                           device=engine.device)  # counts where the ids are: no sync
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
        if self.transport is not None:
            self.metrics.wire(self.transport.wire_stats(), s.steps)
        router = self.engine.engine.router
        if router is not None and self.cfg.capacity_factor is not None:
            self.metrics.overflow(router.overflow_counts())

    def _summary(self) -> dict:
        s = self.engine.stats()
        return {"running": s.running, "waiting": s.waiting, "kv_cache_usage": s.kv_cache_usage,
                "num_blocks": s.num_blocks, "placement_epoch": self._epoch(), **self.metrics.summary()}

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       sink: SinkTarget | None = None) -> AsyncIterator[StreamItem]:
        """Stream a :class:`StepTokens` per step (``finish_reason`` on the last), or one :class:`StreamError`.

        With ``sink`` (the ingress's output sink and this request's key on it) the per-step deltas go
        to that sink, batched with the other requests of the step, and the Serve stream carries only
        the last item, whose ``output_token_ids`` lists every output token (so the ingress fills in
        anything the sink did not deliver); while the sink is unreachable the deltas come on the
        Serve stream as without it.
        """
        timer, m, done = RequestTimer(), self.metrics, False
        target = sink
        produced: list[int] = []
        try:
            if not isinstance(params, SamplingParams):
                raise RequestError(f"sampling parameters must be SamplingParams, not {type(params).__name__}")
            if target is not None and not await self._sink_pusher().ready(target.sink):
                target = None  # the sink is unreachable: every token goes on the Serve call
            async for out in self.engine.generate(request_id, prompt_token_ids, params):
                m.tokens(timer, len(out.new_token_ids))
                offset = len(produced)
                produced.extend(out.new_token_ids)
                new = out.new_token_ids
                if out.finished:
                    done = True
                    m.finished(timer, out.finish_reason, out.num_prompt_tokens)
                elif target is not None:
                    if self._sink_pusher().push(target.sink, target.key, offset, new):
                        continue
                    # the sink is unreachable (deltas it was sent may be lost): the rest of this request
                    # goes on the Serve call, starting with every token so far
                    target, offset, new = None, 0, list(produced)
                yield StepTokens(new, offset, out.finished, out.finish_reason, out.num_prompt_tokens,
                                 out.num_output_tokens,
                                 output_token_ids=produced if out.finished and sink is not None else None)
        except (RequestError, TypeError, QueueFull, EngineFailed) as e:
            done = True
            err = StreamError.of(e)
            m.failed(err.code.value)
            yield err
        finally:
            if not done:  # the caller went away (cancelled, deadline) before the last token
                m.failed("aborted")

    def _sink_pusher(self) -> SinkPusher:
        if self.pusher is None:
            tls = internal_tls(self.cfg)
            self.pusher = SinkPusher(tls.get("channel_credentials"), tls.get("channel_options"))
        return self.pusher

    async def stats(self) -> dict:
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
