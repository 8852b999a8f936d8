"""The engine over gRPC to two expert shards: same greedy tokens as in-process; a dead shard is named."""

from __future__ import annotations

import pytest
import torch

from moeyard.attention.engine import EngineConfig, LLMEngine
from moeyard.attention.sequence import SamplingParams
from moeyard.expert_actors.server import ExpertServer
from moeyard.model.spec import load_spec
from moeyard.router_service.dispatch import plan_dispatch
from moeyard.router_service.grpc_transport import GrpcTransport
from moeyard.router_service.placement import Placement
from moeyard.router_service.transport import ShardUnavailable

PROMPT_LENS = [5, 11, 17, 26]
NEW_TOKENS = 16
E = 8


def _placement(num_moe_layers: int) -> Placement:
    """2 shards x (E + 2) / 2 slots: each shard holds half the experts plus a copy of one on the other shard."""
    rows = []
    for layer in range(num_moe_layers):
        perm = [(e + 3 * layer) % E for e in range(E)]
        a, b = perm[:E // 2], perm[E // 2:]
        rows.append(a + [b[1]] + b + [a[2]])  # b[1] and a[2] have a copy on each shard
    p = Placement(torch.tensor(rows), num_shards=2)
    assert p.slots_per_shard == (E + 2) // 2 and int(p.logcnt.max()) == 2
    return p


def _prompts(vocab: int, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _engine(ckpt, **kw) -> LLMEngine:
    cfg = EngineConfig(dtype="float32", block_size=4, max_num_batched_tokens=24, num_blocks=128)
    return LLMEngine(ckpt, cfg, **kw)


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def cluster(request, hf_models):
    ckpt, _ = hf_models(request.param)
    spec = load_spec(ckpt)
    placement = _placement(spec.num_moe_layers)
    servers = [ExpertServer(s, spec, ckpt, torch.float32, placement.shard_slots(s)) for s in range(2)]
    addresses = {s: srv.address for s, srv in enumerate(servers)}
    transport = GrpcTransport(addresses, timeout_s=10)
    yield dict(family=request.param, ckpt=ckpt, spec=spec, placement=placement, servers=servers,
               addresses=addresses, transport=transport)
    transport.close()
    for srv in servers:
        srv.stop(0)


def test_engine_over_grpc_matches_in_process(cluster):
    ckpt, placement, servers = cluster["ckpt"], cluster["placement"], cluster["servers"]
    remote = _engine(ckpt, transport=cluster["transport"], placement=placement)
    prompts = _prompts(remote.spec.vocab_size)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    got = remote.generate(prompts, params)
    same_placement = _engine(ckpt, placement=placement).generate(prompts, params)
    default = _engine(ckpt).generate(prompts, params)
    assert got == same_placement, cluster["family"]
    assert got == default, cluster["family"]
    assert all(len(g) == NEW_TOKENS for g in got)
    # each token went once to each shard holding any of its experts: fewer hidden bytes than one per
    # (token, expert) row (top-k 2 and 8 over two shards), plus a 4-byte index per row
    st = cluster["transport"].wire_stats()
    assert 0 < st.hidden_bytes < st.per_assignment_bytes
    rows = st.per_assignment_bytes // (4 * cluster["spec"].hidden_size)   # fp32 on the wire
    assert st.index_bytes == 4 * rows
    for srv in servers:  # both shards did work, including their copies of the other shard's experts
        st = srv.status()
        assert st["requests"] > 0 and st["tokens"] > 0


def test_replicated_expert_copies_give_identical_rows(cluster):
    """The same tokens through either copy of a replicated expert (one per shard) come back bit-identical."""
    spec, placement, transport = cluster["spec"], cluster["placement"], cluster["transport"]
    x = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    expert = int(placement.phy2log[0, 4])  # shard 0's extra slot holds a copy of a shard-1 expert
    slots = placement.log2phy[0, expert][placement.log2phy[0, expert] >= 0].tolist()
    assert sorted(placement.shard_of(s) for s in slots) == [0, 1]
    from moeyard.router_service.transport import ShardBatch

    outs = transport.submit(0, [ShardBatch(placement.shard_of(s), [s], [6], x, [expert]) for s in slots],
                            0).result(30)
    assert torch.equal(outs[0], outs[1])


def test_stopped_shard_fails_with_shard_unavailable_then_refresh_recovers(cluster):
    spec, placement = cluster["spec"], cluster["placement"]
    servers, addresses = cluster["servers"], cluster["addresses"]
    transport = GrpcTransport(addresses, timeout_s=10)  # its own channels: the other tests keep theirs
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:spec.moe.top_k] for _ in range(12)])
    _, batches = plan_dispatch(hidden, ids, placement, 1)
    assert {b.shard for b in batches} == {0, 1}
    want = transport.submit(1, batches, 0).result(timeout=30)

    servers[1].stop(0)
    with pytest.raises(ShardUnavailable) as e:
        transport.submit(1, batches, 0).result(timeout=30)
    assert e.value.shard == 1 and "expert shard 1 unavailable" in str(e.value)

    # a replacement shard on a new port: refresh re-reads the (updated) address mapping
    servers[1] = ExpertServer(1, spec, cluster["ckpt"], torch.float32, placement.shard_slots(1))
    addresses[1] = servers[1].address
    with pytest.raises(ShardUnavailable):  # the old channel still points at the dead port
        transport.submit(1, batches, 0).result(timeout=30)
    transport.refresh(1)
    got = transport.submit(1, batches, 0).result(timeout=30)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    cluster["transport"].refresh(1)  # the module's transport follows too
    transport.close()


def test_unknown_shard_and_closed_transport():
    t = GrpcTransport({0: "127.0.0.1:1"}, timeout_s=5)
    from moeyard.router_service.transport import ShardBatch

    with pytest.raises(ShardUnavailable) as e:
        t.submit(0, [ShardBatch(3, [0], [1], torch.zeros(1, 4), [0])], 0).result(timeout=10)
    assert e.value.shard == 3 and "no address known" in str(e.value)
    with pytest.raises(ShardUnavailable) as e:  # nothing listens on port 1: connection refused
        t.submit(0, [ShardBatch(0, [0], [1], torch.zeros(1, 4), [0])], 0).result(timeout=10)
    assert e.value.shard == 0 and "UNAVAILABLE" in str(e.value)
    assert t.submit(0, [], 0).result(timeout=1) == []
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.submit(0, [ShardBatch(0, [0], [1], torch.zeros(1, 4), [0])], 0).result(timeout=10)


def test_live_migration_old_and_new_routers_then_stale_placement(hf_models):
    """Slot 8 moves from a second copy of expert 3 to a copy of expert 6 while two routers (epochs 0 and 1)
    send work: both get exact outputs during the window; after the old copy goes, the epoch-0 router gets
    StalePlacement naming the slot, and the epoch-1 router is still served."""

    from moeyard.attention.engine import build_local_experts
    from moeyard.router_service.transport import ShardBatch, StalePlacement

    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    L = spec.num_moe_layers
    old = Placement(torch.tensor([list(range(E)) + [3]] * L), num_shards=1, epoch=0)
    new = Placement(torch.tensor([list(range(E)) + [6]] * L), num_shards=1, epoch=1)
    ref_old = build_local_experts(ckpt, spec, old, torch.float32)
    ref_new = build_local_experts(ckpt, spec, new, torch.float32)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, spec.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:spec.moe.top_k] for _ in range(10)])
    ids[0], ids[1] = torch.tensor([3, 6]), torch.tensor([3, 6])  # token 1 takes the second copy: slot 8

    def run(placement, transport, moe_layer):
        _, batches = plan_dispatch(hidden, ids, placement, moe_layer)
        assert any(8 in b.slot_ids for b in batches)
        return batches, transport.submit(moe_layer, batches, placement.epoch).result(timeout=30)

    server = ExpertServer(0, spec, ckpt, torch.float32, old.shard_slots(0))
    try:
        with GrpcTransport({0: server.address}, timeout_s=10) as t:
            for layer in range(L):
                batches, got = run(old, t, layer)
                assert all(torch.equal(a, b) for a, b in zip(got, ref_old.submit(layer, batches, 0).result()))
            # (1) stage expert 6 next to expert 3 in slot 8 of every MoE layer
            per_slot = 3 * spec.hidden_size * spec.moe.intermediate_size * 4
            assert t.load_slots(0, [(layer, 8, 6) for layer in range(L)], stage=True) == L * per_slot
            assert t.status(0)["slots"][0][-2:] == [(8, 3), (8, 6)]
            # (2) during the window both routers are served exactly
            for layer in range(L):
                for placement, ref in ((old, ref_old), (new, ref_new)):
                    batches, got = run(placement, t, layer)
                    want = ref.submit(layer, batches, placement.epoch).result()
                    assert all(torch.equal(a, b) for a, b in zip(got, want))
            # a batch must name the expert of every slot (the shard refuses one that does not: test_server)
            with pytest.raises(ValueError, match="experts has 0 entries"):
                ShardBatch(0, [8], [2], hidden[:2], [])
            # (3) release the old copy
            assert t.unload_slots(0, [(layer, 8, 3) for layer in range(L)]) == L
            assert t.status(0)["slots"][0][-1:] == [(8, 6)]
            for layer in range(L):
                batches, got = run(new, t, layer)
                assert all(torch.equal(a, b) for a, b in zip(got, ref_new.submit(layer, batches, 1).result()))
                _, stale = plan_dispatch(hidden, ids, old, layer)
                with pytest.raises(StalePlacement) as e:
                    t.submit(layer, stale, old.epoch).result(timeout=30)
                assert isinstance(e.value, ShardUnavailable) and e.value.shard == 0
                assert e.value.message == (f"slot 8 of MoE layer {layer} holds expert(s) [6], not 3 "
                                           f"(router placement epoch 0 is stale)")
            # the shard serves on; whole-slot unload through the helper still works
            batches, got = run(new, t, 0)
            assert all(torch.equal(a, b) for a, b in zip(got, ref_new.submit(0, batches, 1).result()))
            assert t.unload_slots(0, [(0, 8)]) == 1
            with pytest.raises(StalePlacement, match="slot 8 of MoE layer 0 is not loaded on shard 0, not expert 6"):
                run(new, t, 0)
    finally:
        server.stop(0)


@pytest.mark.parametrize("wire", [None, torch.bfloat16])
def test_a_layer_crosses_to_the_host_in_one_buffer(wire):
    """stage_to_host (the accelerator path, here from host tensors, unpinned): every batch's token rows and
    hidden states are views of one buffer, each aligned to its element size, equal to what was staged."""
    from moeyard.router_service.grpc_transport import stage_to_host
    from moeyard.router_service.transport import ShardBatch

    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 12, generator=g)
    batches = [ShardBatch(0, [0, 1], [3, 2], x[:3], [0, 1], token_rows=torch.tensor([0, 1, 2, 0, 2])),
               ShardBatch(1, [5], [4], x[3:], [5]),
               ShardBatch(2, [6], [1], x[5:6], [2], token_rows=torch.tensor([0]))]
    out = stage_to_host(batches, wire, pin=False)
    base = out[0][0].untyped_storage().data_ptr()
    for b, (h, r) in zip(batches, out):
        assert h.untyped_storage().data_ptr() == base
        assert torch.equal(h, b.hidden.to(wire or b.hidden.dtype)) and h.data_ptr() % h.element_size() == 0
        if b.token_rows is None:
            assert r is None
        else:
            assert r.dtype == torch.int32 and r.tolist() == b.token_rows.tolist()
            assert r.untyped_storage().data_ptr() == base and r.data_ptr() % 4 == 0


def test_the_layers_answers_arrive_in_one_host_buffer(cluster):
    """The transport writes each shard's rows into one [N, D] buffer, in batch order (one copy to the
    device in combine), equal to the shards' own answers."""
    from moeyard.router_service.transport import LayerOutputs

    spec, placement, transport = cluster["spec"], cluster["placement"], cluster["transport"]
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 6]])
    _, batches = plan_dispatch(x, ids, placement, 0)
    outs = transport.submit(0, batches, placement.epoch).result(30)
    assert isinstance(outs, LayerOutputs) and outs.flat.shape == (10, spec.hidden_size)
    assert torch.equal(torch.cat(list(outs)), outs.flat)
    for b, o in zip(batches, outs):
        direct, _ = cluster["servers"][b.shard].compute(0, b.slot_ids, b.counts, b.hidden, placement.epoch,
                                                        b.experts, token_rows=b.token_rows)
        assert torch.equal(o, direct)
