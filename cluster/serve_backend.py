"""The API's backend inside the Serve application: requests go to attention
replicas through a Serve handle (streaming)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from attention.async_engine import EngineFailed, QueueFull
from attention.sequence import RequestError, RequestOutput, SamplingParams
from cluster.config import ClusterConfig
from cluster.spec import ModelSpec

log = logging.getLogger("moeyard.serve")
_ERRORS = {"invalid_argument": RequestError, "resource_exhausted": QueueFull, "unavailable": EngineFailed}


class ServeBackend:
    def __init__(self, replicas, shard_manager, spec: ModelSpec, cfg: ClusterConfig):
        self.replicas = replicas.options(stream=True)
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
        try:
            async for out in self._stream(request_id, prompt_token_ids, params):
                yield out
        finally:
            self.in_flight -= 1

    async def _stream(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams) -> AsyncIterator[RequestOutput]:
        gen = self.replicas.generate.remote(request_id, list(prompt_token_ids), dataclasses.asdict(params))
        assigned = True
        try:
            async for item in gen:
                if "error" in item:
                    raise _ERRORS.get(item["error"], EngineFailed)(item["message"])
                yield RequestOutput(request_id, item["token_ids"], item["finished"], item["finish_reason"],
                                    item["prompt_tokens"], item["completion_tokens"])
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
            if assigned:
                try:
                    gen.cancel()
                except Exception:  # the replica is gone or the call never started: nothing to stop
                    log.debug("request %s: cancel after the stream ended", request_id)

    async def model_info(self) -> dict:
        total, active = self.spec.total_and_active_params()
        s = self.spec
        info = await self.shard_manager.placement_info.remote()
        return {"family": s.family, "model": str(self.cfg.model_dir()), "vocab_size": s.vocab_size,
                "max_model_len": self.cfg.engine.max_model_len or s.max_position_embeddings,
                "num_layers": s.num_layers, "num_moe_layers": s.num_moe_layers,
                "num_experts": s.moe.num_experts if s.moe else 0, "top_k": s.moe.top_k if s.moe else 0,
                "total_params": total, "active_params": active, "dtype": self.cfg.dtype or s.torch_dtype,
                "num_expert_shards": info["num_shards"] if info else 0,
                "num_attention_replicas": self.cfg.attention_replicas,
                "placement_epoch": info["epoch"] if info else 0}
