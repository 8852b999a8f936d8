"""Test harness for the API server: an in-process engine as its backend, and the server on a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from moeyard.attention.async_engine import AsyncEngine
from moeyard.attention.sequence import RequestOutput, SamplingParams
from moeyard.attention.tokenizer import TextTokenizer
from moeyard.cluster.serving.api_server import ApiServer, GenerateBackend, serve_api


class LocalEngineBackend:
    """An in-process :class:`AsyncEngine` as a :class:`GenerateBackend`."""

    def __init__(self, async_engine: AsyncEngine):
        self.async_engine = async_engine
        self.engine = async_engine.engine

    @property
    def tokenizer(self) -> TextTokenizer | None:
        return self.engine.tokenizer

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        return self.async_engine.generate(request_id, prompt_token_ids, params)

    async def model_info(self) -> dict:
        return engine_model_info(self.engine)


def engine_model_info(engine: Any) -> dict:
    """ModelInfoResponse fields of an :class:`moeyard.attention.engine.LLMEngine`."""
    spec = engine.spec
    total, active = spec.total_and_active_params()
    placement = getattr(engine, "placement", None) if spec.moe is not None else None
    top_k = 0
    if spec.moe is not None:
        top_k = getattr(engine.config, "top_k_override", None) or spec.moe.top_k
    return {
        "family": spec.family,
        "model": str(engine.model_dir),
        "vocab_size": spec.vocab_size,
        "max_model_len": engine.max_model_len,
        "num_layers": spec.num_layers,
        "num_moe_layers": spec.num_moe_layers,
        "num_experts": spec.moe.num_experts if spec.moe else 0,
        "top_k": top_k,
        "total_params": total,
        "active_params": active,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "has_tokenizer": engine.tokenizer is not None,
        "num_expert_shards": placement.num_shards if placement is not None else 0,
        "num_attention_replicas": 1,
        "placement_epoch": placement.epoch if placement is not None else 0,
    }


@dataclass
class ApiServerThread:
    """The API server on an event loop of its own thread (for synchronous programs and tests).

    ``backend_factory`` runs on that loop and returns the backend (so it may
    build asyncio objects); ``serve_kwargs`` go to :func:`serve_api`."""

    backend: GenerateBackend
    tokenizer: TextTokenizer | None
    serve_kwargs: dict
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    server: ApiServer

    @classmethod
    def start(cls, backend: GenerateBackend, tokenizer: TextTokenizer | None, **serve_kwargs) -> ApiServerThread:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="moeyard-api", daemon=True)
        thread.start()
        try:
            server = asyncio.run_coroutine_threadsafe(serve_api(backend, tokenizer, **serve_kwargs), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            raise
        return cls(backend, tokenizer, serve_kwargs, loop, thread, server)

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self, grace: float | None = 1.0) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
