"""A real ExpertServer on loopback: same outputs as in-process, health, status, slot moves, errors."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeyard.expert_actors.server import ExpertServer
from moeyard.expert_actors.slots import ExpertSlots
from moeyard.expert_actors.wire import tensor_from_proto, tensor_to_proto
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.spec import load_spec
from moeyard.router_service.dispatch import plan_dispatch
from moeyard.router_service.grpc_transport import GrpcTransport, ShardCallError
from moeyard.router_service.placement import Placement
from moeyard.router_service.transport import InProcessTransport, StalePlacement
from moeyard.rpc import EXPERT_MAX_MESSAGE_BYTES, EXPERT_SERVICE, EXPERT_WIRE_VERSION, grpc_options
from moeyard.v1 import expert_pb2 as pb
from moeyard.v1 import expert_pb2_grpc as pb_grpc


def compute_request(**fields) -> pb.ComputeRequest:
    """A ComputeRequest of the current wire format version."""
    return pb.ComputeRequest(wire_version=EXPERT_WIRE_VERSION, **fields)

E = 8


@pytest.fixture(scope="module")
def setup(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    # one shard, 8 experts + a second copy of expert 3 (slot 8) in every MoE layer
    row = list(range(E)) + [3]
    placement = Placement(torch.tensor([row] * spec.num_moe_layers), num_shards=1)
    assignments = placement.shard_slots(0)
    server = ExpertServer(0, spec, ckpt, torch.float32, assignments)
    local = ExpertSlots(spec, torch.float32)
    reader = CheckpointReader(ckpt)
    for layer, pairs in assignments.items():
        local.load(reader, layer, pairs)
    channel = grpc.insecure_channel(server.address, options=grpc_options(EXPERT_MAX_MESSAGE_BYTES))
    yield dict(ckpt=ckpt, spec=spec, placement=placement, server=server, local=InProcessTransport({0: local}),
               stub=pb_grpc.ExpertServiceStub(channel), channel=channel)
    channel.close()
    server.stop(0)


def _batches(spec, placement, moe_layer, t=13, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, spec.hidden_size, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:spec.moe.top_k] for _ in range(t)])
    if t >= 2:  # expert 3 from tokens 0 and 1: copies are chosen round-robin, so both slots 3 and 8 get work
        ids[0], ids[1] = torch.tensor([3, 0]), torch.tensor([3, 1])
    return plan_dispatch(hidden, ids, placement, moe_layer)[1]


def _valid_request(spec, slot=0, rows=4, moe_layer=0, expert=None):
    """A Compute request for one slot; slot ``s < E`` holds expert ``s`` here."""
    req = compute_request(moe_layer=moe_layer, epoch=0, slot_ids=[slot], counts=[rows],
                            experts=[slot if expert is None else expert])
    tensor_to_proto(torch.randn(rows, spec.hidden_size), out=req.hidden)
    return req


def test_address_is_loopback_with_a_picked_port(setup):
    host, port = setup["server"].address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0


def test_grpc_outputs_equal_in_process_outputs(setup):
    spec, placement = setup["spec"], setup["placement"]
    with GrpcTransport({0: setup["server"].address}) as remote:
        for moe_layer in range(spec.num_moe_layers):
            for t in (1, 13, 40):
                batches = _batches(spec, placement, moe_layer, t=t, seed=moe_layer * 100 + t)
                assert any(8 in b.slot_ids for b in batches) or t == 1  # the second copy is used
                want = setup["local"].submit(moe_layer, batches, 0).result()
                got = remote.submit(moe_layer, batches, 0).result(timeout=30)
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    assert g.dtype == torch.float32 and torch.equal(g, w)


def test_bf16_on_the_wire_is_close_and_returns_the_input_dtype(setup):
    spec, placement = setup["spec"], setup["placement"]
    batches = _batches(spec, placement, 1, t=16, seed=5)
    want = setup["local"].submit(1, batches, 0).result()
    with GrpcTransport({0: setup["server"].address}, wire_dtype=torch.bfloat16) as remote:
        got = remote.submit(1, batches, 0).result(timeout=30)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0.05, rtol=0.02)
        assert not torch.equal(g, w)  # it did go through bf16


def test_health_is_serving(setup):
    health = health_pb2_grpc.HealthStub(setup["channel"])
    for service in ("", EXPERT_SERVICE):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_status_reports_slots_and_memory(setup):
    spec = setup["spec"]
    st = setup["stub"].Status(pb.StatusRequest(), timeout=10)
    assert st.shard_id == 0 and st.pid == os.getpid() and st.dtype == "float32"
    assert st.address == setup["server"].address
    per_slot = 3 * spec.hidden_size * spec.moe.intermediate_size * 4
    assert st.weight_bytes == spec.num_moe_layers * (E + 1) * per_slot
    assert st.rss_bytes > st.weight_bytes
    assert [ls.moe_layer for ls in st.layers] == list(range(spec.num_moe_layers))
    for ls in st.layers:
        assert list(ls.slot_ids) == list(range(E + 1)) and list(ls.experts) == list(range(E)) + [3]
    with GrpcTransport({0: setup["server"].address}) as remote:
        d = remote.status(0)
    assert d["slots"][1] == list(enumerate(list(range(E)) + [3]))
    assert d["requests"] >= 0 and d["last_epoch"] >= -1


def test_server_reads_only_its_own_experts(setup):
    spec = setup["spec"]
    server = ExpertServer(3, spec, setup["ckpt"], "float32", {0: [(30, 2)], 1: [(31, 6), (32, 2)]})
    try:
        experts = sorted({n.split(".experts.")[1].split(".")[0] + "@" + n.split(".")[2] for n in server.reader.reads})
        assert experts == ["2@0", "2@1", "6@1"]
        assert all(".experts." in n for n in server.reader.reads)  # no attention, router or norm tensors
        assert server.status()["slots"] == {0: [(30, 2)], 1: [(31, 6), (32, 2)]}
    finally:
        server.stop(0)


def test_load_and_unload_slots(setup):
    spec, stub, server = setup["spec"], setup["stub"], setup["server"]
    reads_before = len(server.reader.reads)
    resp = stub.LoadSlots(pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=1, slot=20, expert=5)]),
                          timeout=30)
    per_slot = 3 * spec.hidden_size * spec.moe.intermediate_size * 4
    assert resp.bytes_loaded == per_slot and resp.weight_bytes == server.slots.nbytes()
    new_reads = server.reader.reads[reads_before:]
    assert len(new_reads) == 3 and all(".layers.1." in n and ".experts.5." in n for n in new_reads)
    st = stub.Status(pb.StatusRequest(), timeout=10)
    assert dict(zip(st.layers[1].slot_ids, st.layers[1].experts))[20] == 5
    # slot 20 answers exactly like slot 5 (both hold expert 5)
    x = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    outs = []
    for slot in (20, 5):
        req = compute_request(moe_layer=1, epoch=1, slot_ids=[slot], counts=[6], experts=[5])
        tensor_to_proto(x, out=req.hidden)
        outs.append(stub.Compute(req, timeout=30))
    assert outs[0].output.data == outs[1].output.data
    assert outs[0].shard_id == 0 and outs[0].compute_seconds > 0

    resp = stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=1, slot=20),
                                                         pb.SlotRef(moe_layer=1, slot=77)]), timeout=10)
    assert resp.slots_unloaded == 1
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(_valid_request(spec, slot=20, moe_layer=1, expert=5), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details().startswith("slot 20 of MoE layer 1 is not loaded on shard 0, not expert 5")
    assert 20 not in [s for s, _ in server.status()["slots"][1]]
    assert server.status()["last_epoch"] >= 1


def _compute(spec, **fields):
    """A Compute request with defaults overridden; ``hidden`` given as (dtype, shape, nbytes)."""
    dtype, shape, nbytes = fields.pop("hidden", ("float32", [4, spec.hidden_size], None))
    nbytes = 4 * shape[0] * shape[1] if nbytes is None else nbytes
    fields.setdefault("experts", list(fields.get("slot_ids", [1])))  # slot s < E holds expert s here
    req = compute_request(moe_layer=0, epoch=0, slot_ids=[1], counts=[4])
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(req, k).extend(v)
            del getattr(req, k)[:-len(v) or None]
        else:
            setattr(req, k, v)
    req.hidden.dtype = dtype
    req.hidden.shape.extend(shape)
    req.hidden.data = b"\0" * nbytes
    return req


MALFORMED = [
    ("moe_layer_too_big", dict(moe_layer=5), "INVALID_ARGUMENT", "moe_layer 5 out of range [0, 2)"),
    ("moe_layer_negative", dict(moe_layer=-1), "INVALID_ARGUMENT", "moe_layer -1 out of range [0, 2)"),
    ("length_mismatch", dict(slot_ids=[1, 2]), "INVALID_ARGUMENT", "slot_ids has 2 entries but counts has 1"),
    ("counts_vs_rows", dict(counts=[5]), "INVALID_ARGUMENT", "counts sum to 5 but hidden has 4 rows"),
    ("negative_count", dict(slot_ids=[1, 2], counts=[5, -1]), "INVALID_ARGUMENT", "non-negative"),
    ("bytes_vs_shape", dict(hidden=("float32", [4, 64], 1020)), "INVALID_ARGUMENT", "needs 1024 bytes, got 1020"),
    ("bf16_bytes_vs_shape", dict(hidden=("bfloat16", [4, 64], 1024)), "INVALID_ARGUMENT",
     "needs 512 bytes, got 1024"),
    ("unknown_dtype", dict(hidden=("float16", [4, 64], 512)), "INVALID_ARGUMENT", "unknown tensor dtype 'float16'"),
    ("wrong_hidden_size", dict(hidden=("float32", [4, 32], None)), "INVALID_ARGUMENT",
     "hidden must have shape [N, 64], got [4, 32]"),
    ("one_dim_hidden", dict(hidden=("float32", [4], 16)), "INVALID_ARGUMENT", "hidden must have shape [N, 64]"),
    ("no_experts", dict(experts=[]), "INVALID_ARGUMENT",
     "experts has 0 entries but slot_ids has 1 (name the logical expert expected in each slot)"),
    ("experts_length", dict(experts=[1, 2]), "INVALID_ARGUMENT", "experts has 2 entries but slot_ids has 1"),
    ("expert_out_of_range", dict(experts=[8]), "INVALID_ARGUMENT", "logical expert 8 out of range [0, 8)"),
    ("wrong_expert", dict(experts=[2], epoch=6), "NOT_FOUND",
     "slot 1 of MoE layer 0 holds expert(s) [1], not 2 (router placement epoch 6 is stale)"),
    ("unknown_slot_named_expert", dict(moe_layer=1, slot_ids=[42], experts=[2], epoch=3), "NOT_FOUND",
     "slot 42 of MoE layer 1 is not loaded on shard 0, not expert 2 (router placement epoch 3 is stale, or shard 0 "
     "lost its slots (restart))"),
]


@pytest.mark.parametrize("name, fields, code, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_compute_is_refused_and_the_server_lives_on(setup, name, fields, code, message):
    spec, stub = setup["spec"], setup["stub"]
    with pytest.raises(grpc.RpcError) as e:
        stub.Compute(_compute(spec, **fields), timeout=10)
    assert e.value.code() == getattr(grpc.StatusCode, code), e.value.details()
    assert message in e.value.details()
    ok = stub.Compute(_valid_request(spec), timeout=10)
    assert list(ok.output.shape) == [4, spec.hidden_size]


@pytest.mark.parametrize("request_, code, message", [
    (pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=0, slot=50, expert=99)]), "INVALID_ARGUMENT",
     "logical expert 99 out of range [0, 8)"),
    (pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=9, slot=50, expert=1)]), "INVALID_ARGUMENT",
     "moe_layer 9 out of range [0, 2)"),
    (pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=0, slot=-3, expert=1)]), "INVALID_ARGUMENT",
     "slot id -3 is negative"),
    (pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=4, slot=1)]), "INVALID_ARGUMENT",
     "moe_layer 4 out of range [0, 2)"),
    (pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=0, slot=2), pb.SlotRef(moe_layer=0, slot=1, expert=99)]),
     "INVALID_ARGUMENT", "logical expert 99 out of range [0, 8)"),
    (pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=0, slot=50, expert=1),
                                pb.SlotAssignment(moe_layer=0, slot=8, expert=1),
                                pb.SlotAssignment(moe_layer=0, slot=8, expert=2)], stage=True),
     "FAILED_PRECONDITION", "slot 8 of MoE layer 0 already holds experts [3, 1]; unload one before staging"),
], ids=["bad_expert", "bad_layer", "negative_slot", "unload_bad_layer", "unload_bad_expert", "third_copy"])
def test_malformed_slot_changes_are_refused_and_change_nothing(setup, request_, code, message):
    stub, server = setup["stub"], setup["server"]
    before = server.status()["slots"]
    method = stub.LoadSlots if isinstance(request_, pb.LoadSlotsRequest) else stub.UnloadSlots
    with pytest.raises(grpc.RpcError) as e:
        method(request_, timeout=10)
    assert e.value.code() == getattr(grpc.StatusCode, code) and message in e.value.details()
    assert server.status()["slots"] == before
    assert stub.Status(pb.StatusRequest(), timeout=10).shard_id == 0


def test_empty_batch_and_a_refusal_through_the_transport(setup):
    spec, stub = setup["spec"], setup["stub"]
    req = compute_request(moe_layer=0)
    tensor_to_proto(torch.empty(0, spec.hidden_size), out=req.hidden)
    assert list(stub.Compute(req, timeout=10).output.shape) == [0, spec.hidden_size]
    from moeyard.router_service.transport import ShardBatch

    bad = ShardBatch(0, [42], [2], torch.zeros(2, spec.hidden_size), [2])
    with GrpcTransport({0: setup["server"].address}) as remote:
        with pytest.raises(StalePlacement) as e:  # NOT_FOUND: the router's placement is stale
            remote.submit(0, [bad], 0).result(timeout=30)
        assert e.value.shard == 0
        assert "slot 42 of MoE layer 0 is not loaded on shard 0" in str(e.value)
        bad_rows = ShardBatch(0, [1], [3], torch.zeros(2, spec.hidden_size), [1])
        with pytest.raises(ShardCallError) as e:  # any other refusal stays a ShardCallError
            remote.submit(0, [bad_rows], 0).result(timeout=30)
        assert e.value.shard == 0 and e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_assignments_fail_the_constructor(setup):
    with pytest.raises(ValueError, match=r"expert shard 4: logical expert 99 out of range \[0, 8\)"):
        ExpertServer(4, setup["spec"], setup["ckpt"], "float32", {0: [(0, 99)]})
    with pytest.raises(ValueError, match="unsupported dtype 'float64'"):
        ExpertServer(4, setup["spec"], setup["ckpt"], "float64", {0: [(0, 1)]})


def test_concurrent_computes_while_slots_move(setup):
    """Compute calls from several threads stay exact while other slots load and unload."""
    import threading

    spec, placement = setup["spec"], setup["placement"]
    batches = _batches(spec, placement, 0, t=24, seed=9)
    want = setup["local"].submit(0, batches, 0).result()
    errors: list[BaseException] = []
    done = []
    stop = threading.Event()

    def hammer():
        with GrpcTransport({0: setup["server"].address}) as remote:
            while True:
                try:
                    got = remote.submit(0, batches, 0).result(timeout=30)
                    assert all(torch.equal(g, w) for g, w in zip(got, want))
                except BaseException as e:  # reported below
                    errors.append(e)
                    return
                done.append(1)
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    stub = setup["stub"]
    for i in range(10):
        stub.LoadSlots(pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=0, slot=40 + i, expert=i % E)]),
                       timeout=30)
        if i % 2:
            stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=0, slot=40 + i - 1)]), timeout=30)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    assert len(done) >= 3
    stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=0, slot=40 + i) for i in range(10)]),
                     timeout=30)
    assert setup["server"].status()["slots"][0] == list(enumerate(list(range(E)) + [3]))


# -- live migration: a staged copy next to the old one, explicit experts, stale routers -----------

MIG_LAYER, MIG_SLOT, OLD, NEW = 1, 5, 5, 7


@pytest.fixture
def shard(setup):
    """A fresh shard of its own (slot e holds expert e in every MoE layer) and a stub to it."""
    spec = setup["spec"]
    server = ExpertServer(0, spec, setup["ckpt"], torch.float32,
                          {layer: [(e, e) for e in range(E)] for layer in range(spec.num_moe_layers)})
    channel = grpc.insecure_channel(server.address, options=grpc_options(EXPERT_MAX_MESSAGE_BYTES))
    per_slot = 3 * spec.hidden_size * spec.moe.intermediate_size * 4
    yield dict(spec=spec, server=server, stub=pb_grpc.ExpertServiceStub(channel), per_slot=per_slot,
               ref=setup["local"].shards[0])  # the module's in-process copy: slot e holds expert e
    channel.close()
    server.stop(0)


def _x(spec, rows=6, seed=11):
    return torch.randn(rows, spec.hidden_size, generator=torch.Generator().manual_seed(seed))


def _call(stub, x, slot_ids, counts, experts, moe_layer=MIG_LAYER, epoch=0):
    req = compute_request(moe_layer=moe_layer, epoch=epoch, slot_ids=slot_ids, counts=counts, experts=experts)
    tensor_to_proto(x, out=req.hidden)
    return tensor_from_proto(stub.Compute(req, timeout=30).output)


def _want(shard, expert, x, moe_layer=MIG_LAYER):
    return shard["ref"].compute(moe_layer, [expert], [x.shape[0]], x, [expert])


def _stage(stub, expert=NEW, slot=MIG_SLOT, moe_layer=MIG_LAYER):
    return stub.LoadSlots(pb.LoadSlotsRequest(
        slots=[pb.SlotAssignment(moe_layer=moe_layer, slot=slot, expert=expert)], stage=True), timeout=30)


def test_staged_slot_serves_both_experts_exactly(shard):
    spec, stub, server = shard["spec"], shard["stub"], shard["server"]
    x = _x(spec)
    before = stub.Status(pb.StatusRequest(), timeout=10).weight_bytes
    resp = _stage(stub)
    assert resp.bytes_loaded == shard["per_slot"] and resp.weight_bytes == before + shard["per_slot"]
    st = stub.Status(pb.StatusRequest(), timeout=10)
    ls = st.layers[MIG_LAYER]
    pairs = list(zip(ls.slot_ids, ls.experts))
    assert pairs == sorted([(e, e) for e in range(E)] + [(MIG_SLOT, NEW)])  # the slot appears twice
    assert server.status()["slots"][MIG_LAYER] == pairs
    assert st.weight_bytes == before + shard["per_slot"]
    # the old router (expects OLD) and the new one (expects NEW) both get their expert's exact output
    assert torch.equal(_call(stub, x, [MIG_SLOT], [6], [OLD], epoch=3), _want(shard, OLD, x))
    assert torch.equal(_call(stub, x, [MIG_SLOT], [6], [NEW], epoch=4), _want(shard, NEW, x))
    assert not torch.equal(_want(shard, OLD, x), _want(shard, NEW, x))
    # one batch with other slots around it, every slot named
    got = _call(stub, x, [2, MIG_SLOT, 6], [1, 3, 2], [2, NEW, 6], epoch=4)
    want = torch.cat([_want(shard, 2, x[:1]), _want(shard, NEW, x[1:4]), _want(shard, 6, x[4:])])
    assert torch.equal(got, want)


def test_a_request_that_names_no_expert_is_refused(shard):
    """Every slot's expert must be named, whether the slot holds one copy or two (a migration)."""
    spec, stub = shard["spec"], shard["stub"]
    x = _x(spec)
    _stage(stub)
    for slots in ([MIG_SLOT], [3]):
        with pytest.raises(grpc.RpcError) as e:
            _call(stub, x, slots, [6], [], epoch=4)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == ("experts has 0 entries but slot_ids has 1 "
                                     "(name the logical expert expected in each slot)")
    assert torch.equal(_call(stub, x, [3], [6], [3]), _want(shard, 3, x))


def test_unloading_the_old_expert_leaves_the_new_one_and_frees_its_bytes(shard):
    spec, stub, server = shard["spec"], shard["stub"], shard["server"]
    x = _x(spec)
    before = server.slots.nbytes()
    _stage(stub)
    old_row = server.slots.table(MIG_LAYER).row_of[(MIG_SLOT, OLD)]
    resp = stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=MIG_LAYER, slot=MIG_SLOT, expert=OLD)]),
                            timeout=30)
    assert resp.slots_unloaded == 1 and resp.weight_bytes == before
    assert old_row not in server.slots.table(MIG_LAYER).row_of.values()  # the released copy's row is free
    assert server.status()["slots"][MIG_LAYER] == sorted([(e, e) for e in range(E) if e != OLD] + [(MIG_SLOT, NEW)])
    assert stub.Status(pb.StatusRequest(), timeout=10).weight_bytes == before
    assert torch.equal(_call(stub, x, [MIG_SLOT], [6], [NEW], epoch=4), _want(shard, NEW, x))
    with pytest.raises(grpc.RpcError) as e:
        _call(stub, x, [MIG_SLOT], [6], [OLD], epoch=3)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # a copy not held is ignored; the whole slot can still go at once
    again = stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=MIG_LAYER, slot=MIG_SLOT, expert=OLD)]),
                             timeout=30)
    assert again.slots_unloaded == 0 and again.weight_bytes == before
    gone = stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=MIG_LAYER, slot=MIG_SLOT)]), timeout=30)
    assert gone.slots_unloaded == 1 and gone.weight_bytes == before - shard["per_slot"]


def test_wrong_expert_is_not_found_naming_everything_then_the_server_serves_on(shard):
    spec, stub = shard["spec"], shard["stub"]
    x = _x(spec)
    with pytest.raises(grpc.RpcError) as e:
        _call(stub, x, [MIG_SLOT], [6], [NEW], epoch=4)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == (f"slot {MIG_SLOT} of MoE layer {MIG_LAYER} holds expert(s) [{OLD}], not {NEW} "
                                 f"(router placement epoch 4 is stale)")
    _stage(stub)
    stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=MIG_LAYER, slot=MIG_SLOT, expert=OLD)]),
                     timeout=30)
    with pytest.raises(grpc.RpcError) as e:  # a router still on the old epoch
        _call(stub, x, [3, MIG_SLOT], [2, 4], [3, OLD], epoch=3)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == (f"slot {MIG_SLOT} of MoE layer {MIG_LAYER} holds expert(s) [{NEW}], not {OLD} "
                                 f"(router placement epoch 3 is stale)")
    assert torch.equal(_call(stub, x, [MIG_SLOT], [6], [NEW], epoch=4), _want(shard, NEW, x))
    assert shard["server"].status()["last_epoch"] == 4  # refused calls do not count


def test_replacing_load_drops_both_copies(shard):
    stub, server = shard["stub"], shard["server"]
    _stage(stub)
    stub.LoadSlots(pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=MIG_LAYER, slot=MIG_SLOT, expert=2)]),
                   timeout=30)
    assert [p for p in server.status()["slots"][MIG_LAYER] if p[0] == MIG_SLOT] == [(MIG_SLOT, 2)]
    assert server.slots.nbytes() == shard["spec"].num_moe_layers * E * shard["per_slot"]


def test_computes_stay_exact_while_a_slot_migrates_back_and_forth(shard):
    """Threads keep computing (old expert named on the migrating slot, another slot beside) while loads and
    unloads of a second copy run on another thread: every answer is the right expert's, none fails."""
    spec, stub = shard["spec"], shard["stub"]
    x = _x(spec, rows=8, seed=4)
    want_named = torch.cat([_want(shard, 1, x[:3]), _want(shard, OLD, x[3:])])
    want_other = _want(shard, 6, x)
    errors: list[BaseException] = []
    counts = [0, 0]
    stop = threading.Event()

    def hammer(i):
        channel = grpc.insecure_channel(shard["server"].address, options=grpc_options(EXPERT_MAX_MESSAGE_BYTES))
        s = pb_grpc.ExpertServiceStub(channel)
        try:
            while not stop.is_set():
                if i == 0:
                    assert torch.equal(_call(s, x, [1, MIG_SLOT], [3, 5], [1, OLD]), want_named)
                else:
                    assert torch.equal(_call(s, x, [6], [8], [6]), want_other)
                counts[i] += 1
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            channel.close()

    threads = [threading.Thread(target=hammer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    try:
        for i in range(12):
            new = (NEW + i) % E if (NEW + i) % E != OLD else 0
            _stage(stub, new)
            if i % 3 == 0:  # a full replacing load of another slot in the same layer
                stub.LoadSlots(pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=MIG_LAYER, slot=20 + i,
                                                                            expert=new)]), timeout=30)
            stub.UnloadSlots(pb.UnloadSlotsRequest(slots=[pb.SlotRef(moe_layer=MIG_LAYER, slot=MIG_SLOT, expert=new),
                                                          pb.SlotRef(moe_layer=MIG_LAYER, slot=20 + i)]), timeout=30)
        deadline = time.monotonic() + 30
        while min(counts) < 1 and not errors and time.monotonic() < deadline:  # each thread got answers
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[0]
    assert min(counts) >= 1
    assert shard["server"].status()["slots"][MIG_LAYER] == [(e, e) for e in range(E)]


def test_compute_is_served_while_a_load_builds_its_weights(shard, monkeypatch):
    """A LoadSlots stuck writing its rows does not hold Compute back (it runs on the current table)."""
    from moeyard.expert_actors.slots import LayerStorage

    spec, stub, server = shard["spec"], shard["stub"], shard["server"]
    x = _x(spec)
    building, release = threading.Event(), threading.Event()
    real_write = LayerStorage.write

    def slow_write(*args, **kw):
        building.set()
        assert release.wait(30)
        return real_write(*args, **kw)

    monkeypatch.setattr(LayerStorage, "write", slow_write)
    results = []
    loader = threading.Thread(target=lambda: results.append(_stage(stub)))
    loader.start()
    try:
        assert building.wait(30)
        assert torch.equal(_call(stub, x, [MIG_SLOT], [6], [OLD]), _want(shard, OLD, x))
        with pytest.raises(grpc.RpcError) as e:  # the staged copy is not swapped in yet
            _call(stub, x, [MIG_SLOT], [6], [NEW])
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert (MIG_SLOT, NEW) not in server.status()["slots"][MIG_LAYER]
    finally:
        release.set()
        loader.join(30)
    assert results and results[0].bytes_loaded == shard["per_slot"]
    assert torch.equal(_call(stub, x, [MIG_SLOT], [6], [NEW]), _want(shard, NEW, x))
