"""Fault injection on a real local Ray cluster: kill what serves requests, count what was lost.

* An expert shard's process is killed (SIGKILL) mid-stream:
  - with a copy of every expert elsewhere: zero failed requests, outputs unchanged;
  - without copies: routers wait (bounded) for Ray to restart the shard and reload its slots
    from the published placement, then go on: zero failed requests, outputs unchanged;
  - without copies and with no restart: only the requests in flight past the bound end
    UNAVAILABLE (no hang) and the API keeps answering.
* An attention replica's process is killed mid-stream: its in-flight requests end UNAVAILABLE
  at once, the other replica's requests complete unchanged, and Serve replaces the replica.

``pytest -s`` prints sent / completed / failed per fault (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.client import AsyncMoeyardClient, MoeyardClient, MoeyardError
from moeyard.cluster.config import ClusterConfig, EngineSettings
from moeyard.cluster.serving.app import APP_NAME, build_app
from moeyard.cluster.serving.common import shard_actor_name
from moeyard.cluster.settings.redis import RedisSettings
from moeyard.model.make_model import make_model
from moeyard.model.make_model_options import MakeModelOptions

pytestmark = pytest.mark.timeout(600)
TOKEN = "fault-injection-token-0123456789"
NEW_TOKENS = 48
L, E = 2, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults-model")
    make_model(MakeModelOptions(family="mixtral", layers=L, hidden=64, intermediate=96, experts=E, top_k=2,
                                heads=4, kv_heads=2, vocab=512, dtype="float32", seed=9), d)
    return d


def _prompts(n: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(21)
    return [torch.randint(3, 500, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def reference(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return LLMEngine(model, EngineConfig(dtype="float32")).generate(
            _prompts(), SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        torch.set_num_threads(threads)


def _deploy(model, tmp_path, redis_info, namespace: str, **over) -> str:
    from ray import serve

    (tmp_path / "token").write_text(TOKEN)
    over.setdefault("attention_replicas", 1)
    cfg = ClusterConfig(
        model=str(model), dtype="float32", namespace=namespace, expert_shards=2,
        torch_threads=1, api_token_file=str(tmp_path / "token"), engine=EngineSettings(kv_cache_mib=16),
        redis=RedisSettings(url=redis_info.url, password_file=redis_info.password_file, key_prefix=namespace,
                            socket_timeout_s=0.3),
        **over)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None)
    return serve.get_app_handle(APP_NAME).address.remote().result(timeout_s=120)


class Outcome:
    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.errors: dict[int, tuple[grpc.StatusCode, str, float]] = {}
        self.started = asyncio.Event()


async def _stream_all(addr: str, prompts, outcome: Outcome, t0: float) -> None:
    client = AsyncMoeyardClient(addr, token=TOKEN, timeout=180)

    async def one(i, p):
        ids: list[int] = []
        try:
            async for chunk in client.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True):
                ids.extend(chunk.token_ids)
                outcome.started.set()
            outcome.tokens[i] = ids
        except MoeyardError as e:
            outcome.errors[i] = (e.code, e.message, time.monotonic() - t0)
    try:
        await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    finally:
        await client.close()


async def _with_fault(addr: str, prompts, fault) -> Outcome:
    """Stream every prompt; once tokens flow, run ``fault()`` (in a thread); wait for all."""
    outcome = Outcome()
    t0 = time.monotonic()
    task = asyncio.create_task(_stream_all(addr, prompts, outcome, t0))
    await asyncio.wait_for(outcome.started.wait(), 60)
    await asyncio.to_thread(fault)
    await asyncio.wait_for(task, 300)
    return outcome


def _report(what: str, prompts, out: Outcome) -> None:
    codes = sorted({c.name for c, _, _ in out.errors.values()})
    print(f"\n[fault] {what}: sent {len(prompts)}, completed {len(out.tokens)}, failed {len(out.errors)} {codes}")


def _kill_shard_process(namespace: str, shard: int) -> int:
    import ray

    actor = ray.get_actor(shard_actor_name(ClusterConfig(namespace=namespace), shard), namespace=namespace)
    pid = ray.get(actor.pid.remote(), timeout=30)
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait_shards_healthy(timeout: float = 120) -> list[dict]:
    from ray import serve

    deadline = time.monotonic() + timeout
    while True:
        st = serve.get_deployment_handle("ShardManager", APP_NAME).status.remote().result(timeout_s=60)
        if all(s["healthy"] for s in st):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.5)


@pytest.fixture(scope="module")
def redis_info(tmp_path_factory):
    from moeyard.cluster.infra.redis_server import LocalRedis

    info = LocalRedis.start(tmp_path_factory.mktemp("redis"))
    yield info
    LocalRedis.stop(info)


def test_shard_killed_with_copies_elsewhere_loses_nothing(model, reference, ray_serve, redis_info, tmp_path):
    full = [list(range(E)) * 2] * L            # 2 shards x 8 slots: every expert on both shards
    addr = _deploy(model, tmp_path, redis_info, "fault-copies", placement=full)
    prompts = _prompts()
    out = asyncio.run(_with_fault(addr, prompts, lambda: _kill_shard_process("fault-copies", 0)))
    _report("expert shard SIGKILL, copies elsewhere", prompts, out)
    assert not out.errors
    assert [out.tokens[i] for i in range(len(prompts))] == reference
    _wait_shards_healthy()                      # Ray restarted it


def test_shard_killed_without_copies_waits_for_the_restart(model, reference, ray_serve, redis_info, tmp_path):
    # default placement: 2 shards x 4 slots, no copies; the restart (process + reload) must fit in the bound
    addr = _deploy(model, tmp_path, redis_info, "fault-nocopy", redundant_slots_per_shard=0,
                   shard_restart_wait_s=90)
    prompts = _prompts()
    t0 = time.monotonic()
    out = asyncio.run(_with_fault(addr, prompts, lambda: _kill_shard_process("fault-nocopy", 1)))
    _report(f"expert shard SIGKILL, no copies, restart waited ({time.monotonic() - t0:.1f} s total)", prompts, out)
    assert not out.errors
    assert [out.tokens[i] for i in range(len(prompts))] == reference
    st = _wait_shards_healthy()
    assert sorted(e for _, e in st[1]["slots"][0]) == [4, 5, 6, 7]   # reloaded its own experts


def test_shard_gone_for_good_fails_only_requests_in_flight(model, ray_serve, redis_info, tmp_path):
    import ray

    addr = _deploy(model, tmp_path, redis_info, "fault-gone", redundant_slots_per_shard=0, shard_restart_wait_s=2)
    prompts = _prompts()

    def kill_for_good():
        actor = ray.get_actor(shard_actor_name(ClusterConfig(namespace="fault-gone"), 1), namespace="fault-gone")
        ray.kill(actor, no_restart=True)
    out = asyncio.run(_with_fault(addr, prompts, kill_for_good))
    _report("expert shard killed without restart, no copies, 2 s bound", prompts, out)
    assert out.errors, "requests routed to the lost experts must fail"
    for code, msg, at in out.errors.values():
        assert code == grpc.StatusCode.UNAVAILABLE and "expert" in msg.lower()
        assert at < 60                          # bounded: no hang until the client's deadline
    with MoeyardClient(addr, token=TOKEN, timeout=30) as client:
        assert client.health() == "SERVING"     # the API keeps answering


def _replica_actors():
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "AttentionReplica" in a["name"]]
    return [ray.get_actor(a["name"], namespace="serve") for a in names]


def test_attention_replica_killed_fails_only_its_requests(model, reference, ray_serve, redis_info, tmp_path):
    import ray
    from ray import serve

    addr = _deploy(model, tmp_path, redis_info, "fault-replica", attention_replicas=2)
    replicas = _replica_actors()
    assert len(replicas) == 2
    pids = [ray.get(a.__ray_call__.remote(lambda self: os.getpid()), timeout=30) for a in replicas]
    prompts = _prompts(12)
    reference12 = reference + LLMEngine(model, EngineConfig(dtype="float32")).generate(
        prompts[len(reference):], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    out = asyncio.run(_with_fault(addr, prompts, lambda: os.kill(pids[0], signal.SIGKILL)))
    _report("attention replica SIGKILL (1 of 2)", prompts, out)
    for code, msg, at in out.errors.values():
        assert code == grpc.StatusCode.UNAVAILABLE and "replica" in msg, (code, msg)
        assert at < 60
    for i, ids in out.tokens.items():           # the other replica's requests: unchanged
        assert ids == reference12[i]
    assert out.tokens, "the surviving replica served nothing"
    deadline = time.monotonic() + 180           # Serve replaces the replica
    while True:
        app = serve.status().applications[APP_NAME]
        running = app.deployments["AttentionReplica"].replica_states.get("RUNNING", 0)
        if app.status.value == "RUNNING" and running == 2:
            break
        assert time.monotonic() < deadline, app
        time.sleep(1)
    again = asyncio.run(_with_fault(addr, prompts[:4], lambda: None))
    assert not again.errors and [again.tokens[i] for i in range(4)] == reference12[:4]
