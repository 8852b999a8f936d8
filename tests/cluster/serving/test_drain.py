"""Graceful drain on a real local Ray cluster: deleting or redeploying the application while
requests stream lets them finish (up to ``drain_timeout_s``), with unchanged outputs."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import AsyncMoeyardClient, MoeyardClient, MoeyardError
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.serving.app import APP_NAME, build_app
from moeyard.cluster.settings.dashboard import DashboardSettings
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions

pytestmark = pytest.mark.timeout(600)
TOKEN = "drain-test-token-0123456789"
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("drain-model")
    make_model(MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=96, experts=8, top_k=2,
                                heads=4, kv_heads=2, vocab=512, dtype="float32", seed=13), d)
    return d


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 500, (8 + i,), generator=g).tolist() for i in range(8)]


@pytest.fixture(scope="module")
def reference(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return LLMEngine(model, EngineConfig(dtype="float32")).generate(
            _prompts(), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        torch.set_num_threads(threads)


def _cfg(model, tmp_path, local_redis, **over) -> ClusterConfig:
    (tmp_path / "token").write_text(TOKEN)
    return ClusterConfig(
        model=str(model), dtype="float32", namespace="drain-test", expert_shards=2, attention_replicas=1,
        torch_threads=1, api_token_file=str(tmp_path / "token"), engine=EngineSettings(kv_cache_mib=16),
        drain_timeout_s=60,
        redis=RedisSettings(url=local_redis.url, password_file=local_redis.password_file, key_prefix="drain-test"),
        **over)


def _stream_during(addr: str, prompts, action) -> tuple[dict, dict]:
    """Stream every prompt; when each has its first token, run ``action()`` on a thread."""
    tokens: dict[int, list[int]] = {}
    errors: dict[int, str] = {}

    async def main():
        client = AsyncMoeyardClient(addr, token=TOKEN, timeout=300)
        first = [asyncio.Event() for _ in prompts]

        async def one(i, p):
            ids = []
            try:
                async for chunk in client.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                    ids.extend(chunk.token_ids)
                    first[i].set()
                tokens[i] = ids
            except MoeyardError as e:
                first[i].set()
                errors[i] = f"{e.code.name}: {e.message}"
        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        await asyncio.wait_for(asyncio.gather(*[e.wait() for e in first]), 120)
        done = threading.Event()
        threading.Thread(target=lambda: (action(), done.set()), daemon=True).start()
        await asyncio.gather(*tasks)
        await client.close()
        await asyncio.to_thread(done.wait, 300)
    asyncio.run(main())
    return tokens, errors


def test_delete_drains_requests_in_flight(model, reference, ray_serve, local_redis, tmp_path):
    from ray import serve

    serve.run(build_app(_cfg(model, tmp_path, local_redis)), name=APP_NAME, route_prefix=None)
    addr = serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)
    prompts = _prompts()
    t0 = time.monotonic()
    tokens, errors = _stream_during(addr, prompts, lambda: serve.delete(APP_NAME))
    print(f"\n[drain] serve.delete mid-stream: sent {len(prompts)}, completed {len(tokens)}, failed {len(errors)} "
          f"({time.monotonic() - t0:.1f} s)")
    assert not errors
    assert [tokens[i] for i in range(len(prompts))] == reference
    with pytest.raises(MoeyardError) as e:      # the API is gone afterwards, not half-alive
        with MoeyardClient(addr, token=TOKEN, timeout=5) as client:
            client.generate_all([5, 6], max_new_tokens=2)
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_redeploy_drains_requests_in_flight(model, reference, ray_serve, local_redis, tmp_path):
    from ray import serve

    cfg = _cfg(model, tmp_path, local_redis)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    addr = serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)
    prompts = _prompts()
    # a config change that keeps the shards (same placement fingerprint): every deployment is replaced
    new = cfg.model_copy(update={"dashboard": DashboardSettings(hot_factor=3.0)})
    tokens, errors = _stream_during(addr, prompts, lambda: serve.run(build_app(new), name=APP_NAME,
                                                                     route_prefix=None))
    print(f"\n[drain] redeploy mid-stream: sent {len(prompts)}, completed {len(tokens)}, failed {len(errors)}")
    assert not errors
    assert [tokens[i] for i in range(len(prompts))] == reference
    new_addr = serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)
    with MoeyardClient(new_addr, token=TOKEN, timeout=60) as client:   # the new app serves, same shards
        assert client.generate_all(prompts[0], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == reference[0]
    serve.delete(APP_NAME)
