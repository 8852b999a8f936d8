"""Deterministic mode through a real cluster (2 attention replicas, 2 expert shards, Redis, bf16): the same
concurrent greedy requests, of mixed lengths, give the same tokens run after run, across an expert shard
SIGKILLed mid-way and after a live rebalance, and equal to the in-process engine with the same flag."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import AsyncMoeyardClient
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.serving.app import APP_NAME, build_app
from moeyard.cluster.settings.autoscaler import AutoscalerSettings
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions
from tests.cluster.serving.test_fault_injection import _kill_shard_process, _wait_shards_healthy

pytestmark = pytest.mark.timeout(900)
TOKEN = "deterministic-cluster-token-0123456789"
NS = "det-cluster"
NEW_TOKENS = 24
N_REQUESTS = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("det-model")
    # skewed expert load (Zipf 1.5): a forced rebalance has something to move
    make_model(MakeModelOptions(family="mixtral", layers=2, hidden=64, intermediate=96, experts=8, top_k=2,
                                heads=4, kv_heads=2, vocab=512, dtype="bfloat16", seed=4, skew=1.5), d)
    return d


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(31)
    return [torch.randint(3, 500, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(N_REQUESTS)]


@pytest.fixture(scope="module")
def reference(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                     # what every replica and shard runs at (torch_threads)
    try:
        engine = LLMEngine(model, EngineConfig(dtype="bfloat16", deterministic=True))
        return engine.generate(_prompts(), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cluster(model, ray_serve, local_redis, tmp_path_factory):
    from ray import serve

    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN)
    cfg = ClusterConfig(
        model=str(model), dtype="bfloat16", deterministic=True, namespace=NS, expert_shards=2,
        redundant_slots_per_shard=1, attention_replicas=2, torch_threads=1, shard_restart_wait_s=90,
        api_token_file=str(token_file), engine=EngineSettings(kv_cache_mib=16),
        redis=RedisSettings(url=local_redis.url, password_file=local_redis.password_file, key_prefix=NS,
                            window_s=1.0, flush_interval_s=0.2, socket_timeout_s=0.3),
        # never on its own (the test forces the one rebalance)
        autoscaler=AutoscalerSettings(interval_s=0.5, lookback_s=60, sustain_s=3600, cooldown_s=3600,
                                      min_tokens=100, reconcile_interval_s=2))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    yield serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)
    serve.delete(APP_NAME)


async def _round(addr: str, prompts, fault=None) -> list[list[int]]:
    """All prompts at once; ``fault()`` runs (in a thread) once the first tokens have come back."""
    client = AsyncMoeyardClient(addr, token=TOKEN, timeout=300)
    first = asyncio.Event()

    async def one(p):
        ids = []
        async for chunk in client.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True):
            ids.extend(chunk.token_ids)
            first.set()
        return ids
    try:
        task = asyncio.gather(*[one(p) for p in prompts])
        if fault is not None:
            await asyncio.wait_for(first.wait(), 120)
            await asyncio.to_thread(fault)
        return await asyncio.wait_for(task, 600)
    finally:
        await client.close()


def test_same_tokens_across_runs_a_shard_kill_and_a_rebalance(cluster, reference):
    from ray import serve

    prompts = _prompts()
    first = asyncio.run(_round(cluster, prompts))
    assert first == reference                               # the in-process engine, same flag
    again = asyncio.run(_round(cluster, prompts))
    assert again == first
    killed = asyncio.run(_round(cluster, prompts, lambda: _kill_shard_process(NS, 0)))
    assert killed == first
    _wait_shards_healthy()
    time.sleep(2.5)                                         # load windows of the runs above reach Redis
    result = serve.get_deployment_handle("Autoscaler", APP_NAME).rebalance.remote().result(timeout_s=300)
    assert result.acted and result.slots_moved > 0, result    # the experts moved
    after = asyncio.run(_round(cluster, prompts))
    assert after == first
