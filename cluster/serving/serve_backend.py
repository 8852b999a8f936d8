"""The API's backend inside the Serve application: requests go to attention
replicas through a Serve handle (streaming)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from moeyard.attention.async_engine import EngineFailed, QueueFull
from moeyard.attention.sequence import RequestOutput, SamplingParams
from moeyard.cluster.config import ClusterConfig
from moeyard.cluster.serving.output_sink import Delta, OutputSink
from moeyard.cluster.serving.replica_stream import StreamError, StreamItem
from moeyard.cluster.serving.shard_manager import PlacementInfo
from moeyard.model.spec import ModelSpec

log = logging.getLogger("moeyard.serve")


_END = object()


async def _read_into(gen, queue: asyncio.Queue) -> None:
    """Put the Serve call's items on ``queue``, then ``_END`` (or the exception it raised)."""
    try:
        async for item in gen:
            queue.put_nowait(item)
        queue.put_nowait(_END)
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        queue.put_nowait(e)


class _Merge:
    """One request's output tokens from two paths (the sink's deltas and the Serve call's items),
    each tagged with its offset: every token is passed on once and in order."""

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.sent = 0  # output tokens passed on so far

    def delta(self, offset: int, token_ids: list[int]) -> RequestOutput | None:
        """Output tokens ``offset...``; a gap (a lost delta) waits for the final item."""
        if offset > self.sent or offset + len(token_ids) <= self.sent:
            return None
        new = token_ids[self.sent - offset:]
        self.sent += len(new)
        return RequestOutput(self.request_id, new, False, None, self.prompt_tokens, self.sent)

    def item(self, item: StreamItem) -> RequestOutput | None:
        """One item of the replica's Serve stream (a :class:`StreamError` is raised as its exception)."""
        if isinstance(item, StreamError):
            raise item.exception()
        if item.finished:
            every = item.output_token_ids
            if every is None:  # no sink: the item's own tokens, from its offset
                every_new = item.token_ids[max(0, self.sent - item.offset):] if item.offset <= self.sent else []
            else:
                every_new = list(every[self.sent:])
            self.sent += len(every_new)
            return RequestOutput(self.request_id, every_new, True, item.finish_reason,
                                 item.prompt_tokens, item.completion_tokens)
        return self.delta(item.offset, item.token_ids)


class ServeBackend:
    def __init__(self, replicas, shard_manager, spec: ModelSpec, cfg: ClusterConfig, sink: OutputSink | None = None):
        self.replicas = replicas.options(stream=True)
        self.sink = sink
        """Where the replicas send per-step token deltas (None: on each request's Serve call)."""
        self.shard_manager = shard_manager
        self.spec = spec
        self.cfg = cfg
        e = cfg.engine
        self.capacity = cfg.attention_replicas * (e.max_num_seqs + e.max_waiting)
        """Requests the replicas can hold (running + their admission queues): past it the API refuses
        at once instead of letting requests queue in front of the replicas only to be refused there."""
        self.in_flight = 0

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.in_flight >= self.capacity:
            raise QueueFull(f"server is at capacity ({self.capacity} requests in flight); try again later")
        self.in_flight += 1
        stream = self._stream(request_id, prompt_token_ids, params)
        try:
            async for out in stream:
                yield out
        finally:
            self.in_flight -= 1
            await stream.aclose()  # cancel the replica's call now, not when the generator is collected

    async def _stream(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> AsyncIterator[RequestOutput]:
        sink = self.sink
        key, deltas = sink.open() if sink is not None else (None, None)
        gen = self.replicas.generate.remote(request_id, list(prompt_token_ids), params,
                                            sink.spec().target(key) if sink is not None else None)
        assigned = True
        reader = None
        merge = _Merge(request_id, len(prompt_token_ids))
        try:
            if deltas is None:
                async for item in gen:
                    out = merge.item(item)
                    if out is not None:
                        yield out
            else:
                # the Serve call (errors, the final item) and the sink (per-step deltas) feed one queue
                reader = asyncio.get_running_loop().create_task(_read_into(gen, deltas))
                while True:
                    got = await deltas.get()
                    if isinstance(got, Delta):
                        out = merge.delta(got.offset, got.token_ids)
                    elif isinstance(got, BaseException):
                        raise got
                    elif got is _END:
                        return
                    else:
                        out = merge.item(got)
                    if out is not None:
                        yield out
                        if out.finished:
                            return
        except BackPressureError:
            assigned = False  # never reached a replica: nothing to cancel
            raise QueueFull("server is at capacity (every attention replica's queue is full); "
                            "try again later") from None
        except (RayActorError, ActorUnavailableError) as e:
            # the attention replica serving this request died (Serve replaces it): UNAVAILABLE for
            # this request only; the client may retry it, other replicas' requests go on
            log.warning("request %s: its attention replica is gone (%s)", request_id, type(e).__name__)
            raise EngineFailed(f"the attention replica serving this request failed ({type(e).__name__}); "
                               "retry the request") from None
        finally:
            if sink is not None:
                sink.close(key)
            if reader is not None and not reader.done():
                reader.cancel()
            if assigned:
                try:
                    gen.cancel()
                except Exception:  # the replica is gone or the call never started: nothing to stop
                    log.debug("request %s: cancel after the stream ended", request_id)

    async def model_info(self) -> dict:
        s, c = self.spec, self.cfg
        served_k = (c.moe_top_k or s.moe.top_k) if s.moe else 0
        total, active = s.total_and_active_params(served_k or None)
        info: PlacementInfo | None = await self.shard_manager.placement_info.remote()
        return {"family": s.family, "model": str(self.cfg.model_dir()), "vocab_size": s.vocab_size,
                "max_model_len": self.cfg.engine.max_model_len or s.max_position_embeddings,
                "num_layers": s.num_layers, "num_moe_layers": s.num_moe_layers,
                "num_experts": s.moe.num_experts if s.moe else 0, "top_k": s.moe.top_k if s.moe else 0,
                "total_params": total, "active_params": active, "dtype": self.cfg.dtype or s.torch_dtype,
                "num_expert_shards": info.num_shards if info else 0,
                "num_attention_replicas": self.cfg.attention_replicas,
                "placement_epoch": info.epoch if info else 0, "moe_top_k": served_k,
                "capacity_factor": c.capacity_factor or 0.0, "overflow": c.overflow if c.capacity_factor else ""}
