"""Expert shards as Ray actors on a real local cluster: same outputs as in-process; restart + refresh."""

from __future__ import annotations

import os
import time

import pytest
import torch

from moeyard.attention.engine import build_local_experts
from moeyard.cluster.serving.shard_actor import create_shard_actor
from moeyard.model.spec import load_spec
from moeyard.router_service.dispatch import plan_dispatch
from moeyard.router_service.grpc_transport import GrpcTransport
from moeyard.router_service.placement import Placement
from moeyard.router_service.transport import ShardUnavailable

pytestmark = pytest.mark.timeout(240)

E = 8
TIMEOUT = 60


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for this module (reused if the session already started one)."""
    import ray

    started = not ray.is_initialized()
    saved_auth = os.environ.get("RAY_AUTH_MODE")
    if started:
        # address="local": always a fresh cluster, even if RAY_ADDRESS points at a running one.
        # A new local cluster turns token auth on by itself (RAY_AUTH_MODE=token in this process,
        # token generated in ~/.ray/auth_token if missing); nothing else is needed.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 object_store_memory=80 << 20)
    yield ray
    if started:
        ray.shutdown()
        if saved_auth is None:  # ray.init set it for this process; do not leak it to later tests
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth


@pytest.fixture(scope="module")
def shards(ray_cluster, hf_models):
    ray = ray_cluster
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    rows = [[0, 1, 2, 3, 5, 4, 5, 6, 7, 0], [4, 5, 6, 7, 1, 0, 1, 2, 3, 6]]  # 2 shards x 5 slots, 2 replicated
    placement = Placement(torch.tensor(rows[:spec.num_moe_layers]), num_shards=2)
    actors = [create_shard_actor(s, ckpt, placement.shard_slots(s), "float32", num_cpus=1, num_threads=1)
              for s in range(2)]
    assert ray.get([a.ready.remote() for a in actors], timeout=TIMEOUT) == [True, True]
    transport = GrpcTransport(lambda s: ray.get(actors[s].address.remote(), timeout=TIMEOUT), timeout_s=10)
    local = build_local_experts(ckpt, spec, placement, torch.float32)
    yield dict(ray=ray, spec=spec, placement=placement, actors=actors, transport=transport, local=local)
    transport.close()
    for a in actors:
        ray.kill(a, no_restart=True)


def _check_same_outputs(spec, placement, transport, local, seed=0):
    g = torch.Generator().manual_seed(seed)
    for moe_layer in range(spec.num_moe_layers):
        hidden = torch.randn(24, spec.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:spec.moe.top_k] for _ in range(24)])
        _, batches = plan_dispatch(hidden, ids, placement, moe_layer)
        assert {b.shard for b in batches} == {0, 1}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the shards: GEMM results depend on the thread count
        try:
            want = local.submit(moe_layer, batches, 0).result()
        finally:
            torch.set_num_threads(threads)
        got = transport.submit(moe_layer, batches, 0).result(timeout=TIMEOUT)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_actors_serve_the_same_outputs_as_in_process(shards):
    ray, spec, placement = shards["ray"], shards["spec"], shards["placement"]
    _check_same_outputs(spec, placement, shards["transport"], shards["local"])
    for s, actor in enumerate(shards["actors"]):
        st = ray.get(actor.status.remote(), timeout=TIMEOUT)
        assert st["shard_id"] == s and st["pid"] != os.getpid() and st["num_threads"] == 1
        assert st["slots"] == placement.shard_slots(s)  # every (slot, expert) copy, sorted
        assert st["requests"] >= spec.num_moe_layers


def test_killed_actor_restarts_and_refresh_reconnects(shards):
    ray, actors, transport = shards["ray"], shards["actors"], shards["transport"]
    before = ray.get(actors[1].status.remote(), timeout=TIMEOUT)
    ray.kill(actors[1], no_restart=False)

    # ray.kill is asynchronous: the old process may still answer a call or two, so poll
    # until a new process (which reloads its slots in __init__) is ready
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if ray.get(actors[1].ready.remote(), timeout=10) and \
                    ray.get(actors[1].pid.remote(), timeout=10) != before["pid"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        assert time.monotonic() < deadline, "shard actor 1 did not come back"
        time.sleep(0.2)
    after = ray.get(actors[1].status.remote(), timeout=TIMEOUT)
    assert after["pid"] != before["pid"] and after["slots"] == before["slots"]
    assert after["requests"] == 0  # a fresh process

    if after["address"] != before["address"]:  # the old port is gone with the old process
        with pytest.raises(ShardUnavailable) as e:
            transport.submit(0, [_one_batch(shards, shard=1)], 0).result(timeout=TIMEOUT)
        assert e.value.shard == 1
    transport.refresh(1)
    assert transport.address(1) == after["address"]
    _check_same_outputs(shards["spec"], shards["placement"], transport, shards["local"], seed=1)


def _one_batch(shards, shard):
    from moeyard.router_service.transport import ShardBatch

    placement = shards["placement"]
    slot = shard * placement.slots_per_shard
    return ShardBatch(shard, [slot], [2], torch.randn(2, shards["spec"].hidden_size),
                      [int(placement.phy2log[0, slot])])
