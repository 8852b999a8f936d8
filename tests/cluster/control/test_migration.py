"""Live migration on real gRPC shards and a real Redis: generation runs through it unchanged."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bench.synthetic_load import zipf_load
from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.cluster.control.autoscaler import RedisPublisher
from moeyard.cluster.control.migration import (
    GrpcShardControl,
    Migrator,
    layer_changes,
    reconcile,
    reconcile_plan,
    with_layer,
)
from moeyard.cluster.control.placement_follower import PlacementFollower
from moeyard.cluster.control.placement_store import (
    Event,
    push_event,
    read_events,
    read_placement,
    replica_epochs,
    write_placement,
)
from moeyard.expert_actors.server import ExpertServer
from moeyard.model.spec import load_spec
from moeyard.router_service.grpc_transport import GrpcTransport
from moeyard.router_service.load_recorder import LoadRecorder
from moeyard.router_service.placement import Placement, round_robin_placement
from moeyard.router_service.planner import plan_placement

pytestmark = pytest.mark.timeout(180)
FP = "test-model"


@pytest.fixture
def client(local_redis, request):
    c = local_redis.client()
    prefix = f"t{abs(hash(request.node.name)) % 10**8}"
    yield c, prefix
    for k in c.scan_iter(match=f"{prefix}:*"):
        c.delete(k)


def test_placement_roundtrip_and_events(client):
    c, prefix = client
    assert read_placement(c, prefix) is None
    p = round_robin_placement(3, 8, 2, 5, epoch=7)
    write_placement(c, prefix, p, FP)
    got = read_placement(c, prefix)
    assert got.fingerprint == FP and got.placement.epoch == 7 and torch.equal(got.placement.phy2log, p.phy2log)
    push_event(c, prefix, Event("skip", "balanced"))
    push_event(c, prefix, Event("rebalance", "forced", epoch_before=7, epoch_after=9))
    ev = read_events(c, prefix)
    assert [e["kind"] for e in ev] == ["rebalance", "skip"] and ev[0]["epoch_after"] == 9


def test_layer_changes_and_with_layer():
    old = round_robin_placement(2, 4, 2, 3)
    new_rows = old.phy2log.clone()
    new_rows[1] = torch.tensor([0, 1, 0, 2, 3, 1])
    new = Placement(new_rows, 2, 5)
    ch = layer_changes(old, new)
    assert list(ch) == [1]
    diff = (old.phy2log[1] != new.phy2log[1]).nonzero().flatten().tolist()
    assert [slot for slot, _, _ in ch[1]] == diff
    assert all(o == int(old.phy2log[1, s]) and n == int(new.phy2log[1, s]) for s, o, n in ch[1])
    mid = with_layer(old, new, 1, 3)
    assert mid.epoch == 3 and torch.equal(mid.phy2log[1], new.phy2log[1]) and torch.equal(mid.phy2log[0],
                                                                                       old.phy2log[0])


def test_reconcile_plan():
    p = round_robin_placement(1, 4, 2, 3)  # shard 1 holds slots 3,4,5 = experts 3,0,1
    load, release = reconcile_plan(p, {0: [(3, 3), (4, 2), (5, 1)]}, 1)
    assert load == [(0, 4, 0)] and release == [(0, 4, 2)]


@pytest.fixture
def cluster(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    L, E = spec.num_moe_layers, spec.moe.num_experts
    placement = round_robin_placement(L, E, 2, 5)
    servers = [ExpertServer(s, spec, ckpt, torch.float32, placement.shard_slots(s)) for s in range(2)]
    transport = GrpcTransport({s.shard_id: s.address for s in servers}, timeout_s=20)
    yield ckpt, spec, placement, servers, transport
    transport.close()
    for s in servers:
        s.stop(0)


def _prompts(n=6, vocab=256):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _following_engine(cluster, client):
    """An engine on the gRPC shards whose dispatcher records load and follows the placement in Redis;
    returns it with its prompts, sampling params and reference outputs (taken before following)."""
    ckpt, spec, placement, _, transport = cluster
    c, prefix = client
    write_placement(c, prefix, placement, FP)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32"), transport=transport, placement=placement)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = _prompts()
    reference = engine.generate(prompts, sp)
    dispatcher = engine.router.dispatcher
    dispatcher.recorder = LoadRecorder(spec.num_moe_layers, spec.moe.num_experts, placement.num_slots)
    follower = PlacementFollower(dispatcher, c, prefix, "r1", spec.num_moe_layers, spec.moe.num_experts,
                                 poll_s=0.02)
    dispatcher.on_stale = follower.refresh
    follower.start()
    return engine, dispatcher, follower, prompts, sp, reference


def test_live_migration_keeps_outputs(cluster, client):
    _, spec, placement, servers, transport = cluster
    c, prefix = client
    L, E = spec.num_moe_layers, spec.moe.num_experts
    engine, dispatcher, follower, prompts, sp, reference = _following_engine(cluster, client)
    try:
        load = zipf_load(L, E, 1.2, seed=1)
        target = plan_placement(load, 2, 5, current=placement)
        assert layer_changes(placement, target), "the plan must move something for this test"
        migrator = Migrator(GrpcShardControl(transport), RedisPublisher(c, prefix, FP), drain_timeout_s=10)
        results = {}

        def run():
            results["out"] = engine.generate(prompts, sp)

        gen = threading.Thread(target=run)
        gen.start()
        time.sleep(0.05)
        final, report = migrator.apply(placement, target)
        gen.join(timeout=120)
        assert results["out"] == reference
        assert report.layers_moved and report.slots_moved > 0 and report.bytes_loaded > 0
        assert not report.late_replicas
        assert final.epoch == placement.epoch + len(report.layers_moved)
        assert torch.equal(final.phy2log, target.phy2log)
        assert read_placement(c, prefix).placement.epoch == final.epoch
        assert replica_epochs(c, prefix) == {"r1": final.epoch}
        assert dispatcher.placement.epoch == final.epoch
        # the shards hold exactly the new placement: old copies released
        for s in servers:
            held = {layer: sorted(pairs) for layer, pairs in s.held_slots().items()}
            want = {layer: sorted(pairs) for layer, pairs in final.shard_slots(s.shard_id).items()}
            assert held == want
        # after the move, outputs are still the same
        assert engine.generate(prompts, sp) == reference
        snap = dispatcher.recorder.take()
        assert snap.tokens > 0 and int(snap.slot_counts.sum()) == int(snap.expert_counts.sum())
    finally:
        follower.stop()


def test_stale_router_rereads_placement(cluster, client):
    """A replica that missed the switch gets NOT_FOUND from a shard, re-reads the placement and goes on."""
    ckpt, spec, placement, servers, transport = cluster
    c, prefix = client
    L, E = spec.num_moe_layers, spec.moe.num_experts
    write_placement(c, prefix, placement, FP)
    engine = LLMEngine(ckpt, EngineConfig(dtype="float32"), transport=transport, placement=placement)
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = _prompts(3)
    reference = engine.generate(prompts, sp)
    follower = PlacementFollower(engine.router.dispatcher, c, prefix, "late", L, E)  # never started
    engine.router.dispatcher.on_stale = follower.refresh
    target = plan_placement(zipf_load(L, E, 1.2, seed=1), 2, 5, current=placement)
    # a migrator that does not wait for this replica
    migrator = Migrator(GrpcShardControl(transport), RedisPublisher(c, prefix, FP), drain_timeout_s=0.1)
    final, _ = migrator.apply(placement, target)
    assert engine.router.dispatcher.placement.epoch == placement.epoch
    assert engine.generate(prompts, sp) == reference
    assert engine.router.dispatcher.placement.epoch == final.epoch


def test_reconcile_after_restart(cluster, client):
    ckpt, spec, placement, servers, transport = cluster
    target = plan_placement(zipf_load(spec.num_moe_layers, spec.moe.num_experts, 1.2, seed=1), 2, 5,
                            current=placement)
    # shard 1 "restarted" with its creation-time slots while the placement in force is `target`
    ctl = GrpcShardControl(transport)
    for layer, pairs in target.shard_slots(0).items():
        ctl.load(0, [(layer, s, e) for s, e in pairs], False)
    fixed = reconcile(ctl, target, [0, 1])
    assert 1 in fixed and 0 not in fixed
    assert reconcile(ctl, target, [0, 1]) == {}
    for s in servers:
        assert {l: sorted(p) for l, p in s.held_slots().items()} == \
               {l: sorted(p) for l, p in target.shard_slots(s.shard_id).items()}


def test_scale_up_then_down_live(cluster, client):
    """Add a third shard and remove it again while requests decode: outputs never change."""
    from moeyard.cluster.control.migration import scale_target

    ckpt, spec, _, servers, transport = cluster
    c, prefix = client
    L, E = spec.num_moe_layers, spec.moe.num_experts
    engine, dispatcher, follower, prompts, sp, reference = _following_engine(cluster, client)
    extra = {}

    def create(shard_id, assignments):
        extra[shard_id] = ExpertServer(shard_id, spec, ckpt, torch.float32, assignments)
        transport.refresh(shard_id, extra[shard_id].address)

    def remove(shard_id):
        extra.pop(shard_id).stop(0)

    try:
        load = zipf_load(L, E, 1.2, seed=1)
        migrator = Migrator(GrpcShardControl(transport), RedisPublisher(c, prefix, FP), drain_timeout_s=10)
        for step in (+1, -1):
            current = read_placement(c, prefix).placement
            target = scale_target(load, current, current.num_shards + step)
            results = {}
            gen = threading.Thread(target=lambda res=results: res.update(out=engine.generate(prompts, sp)))
            gen.start()
            time.sleep(0.05)
            if step > 0:
                final, report = migrator.scale_up(current, target, create)
            else:
                final, report = migrator.scale_down(current, target, remove)
            gen.join(timeout=120)
            assert results["out"] == reference
            assert final.num_shards == current.num_shards + step
            assert torch.equal(final.phy2log, target.phy2log)
            assert dispatcher.placement.epoch == final.epoch and dispatcher.placement.num_slots == final.num_slots
            live = {s.shard_id: s for s in servers} | extra
            assert sorted(live) == list(range(final.num_shards))
            for sid, s in live.items():
                assert {l: sorted(p) for l, p in s.held_slots().items()} == \
                       {l: sorted(p) for l, p in final.shard_slots(sid).items()}
            assert dispatcher.recorder.num_slots == final.num_slots
            assert engine.generate(prompts, sp) == reference
    finally:
        follower.stop()
        for s in extra.values():
            s.stop(0)


def test_shard_control_looks_a_restarted_shard_up_again(hf_models):
    """A shard restarted by Ray listens on a new port: the control refreshes the address and retries once
    (before, a rebalance after a shard restart failed with 'connection refused' until the process ended)."""
    from moeyard.cluster.control.migration import GrpcShardControl

    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    old = ExpertServer(0, spec, ckpt, torch.float32, {0: [(0, 0)]})
    old_addr = old.address
    old.stop(0)
    new = ExpertServer(0, spec, ckpt, torch.float32, {0: [(0, 0)]})
    addresses = {0: old_addr}
    asked = []

    def resolve(shard: int) -> str:
        asked.append(shard)
        return addresses[shard]
    try:
        with GrpcTransport(resolve, timeout_s=5) as t:
            control = GrpcShardControl(t)
            addresses[0] = new.address          # what the actor would answer now
            t.refresh(0, old_addr)              # ... but the transport still holds the old port
            assert control.held(0)[0] == [(0, 0)]
            assert control.load(0, [(0, 1, 3)], stage=False) > 0
            assert control.unload(0, [(0, 1, 3)]) == 1
            assert t.address(0) == new.address
    finally:
        new.stop(0)
