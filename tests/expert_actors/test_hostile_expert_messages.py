"""Hostile messages to an expert shard over a real socket: every malformed ``Compute`` (and
slot change) gets the right status code and a message naming the problem, and a good Compute
right after returns exactly what the in-process grouped SwiGLU gives.

One ``ExpertServer`` (slot ``e`` holds expert ``e`` in both MoE layers of the tiny Mixtral)
with a 1 MiB message limit, so that an oversized message is cheap to send (the limit is the
same gRPC option at its production size of 256 MiB).

Behaviour this file pins down (see ``proto/moeyard/v1/expert.proto``):

* bytes that do not parse are INVALID_ARGUMENT (grpcio answers INTERNAL "Exception
  deserializing request!"); a negative slot id is INVALID_ARGUMENT (a malformed request, as
  the proto says) rather than NOT_FOUND, which would send the router refreshing its placement;
* a slot the shard does not hold, or one holding another expert than the request names, is
  NOT_FOUND naming the request's epoch; the epoch itself is informational: an old epoch that
  names the experts the slots hold is served (routers on the old epoch keep working during a
  migration);
* NaN/inf in the hidden states are computed on like any value: the shard does not scan its
  input (that would cost a pass over every batch); the non-finite rows come back non-finite
  and every other row is exact (the FFN is row-wise);
* slot ids out of the documented ascending order (or repeated) are served exactly: each
  segment uses its own slot, so order does not matter;
* unknown fields are ignored (protobuf's forward compatibility).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeyard.expert_actors.server import ExpertServer
from moeyard.expert_actors.wire import tensor_from_proto, tensor_to_proto
from moeyard.model.checkpoint import CheckpointReader
from moeyard.model.ffn import grouped_swiglu
from moeyard.model.spec import load_spec
from moeyard.model.weight_names import expert_names
from moeyard.rpc import EXPERT_SERVICE, EXPERT_WIRE_VERSION
from moeyard.v1 import expert_pb2 as pb
from moeyard.v1 import expert_pb2_grpc as pb_grpc


def compute_request(**fields) -> pb.ComputeRequest:
    """A ComputeRequest of the current wire format version."""
    return pb.ComputeRequest(wire_version=EXPERT_WIRE_VERSION, **fields)

E = 8
D = 64  # hidden size of the tiny Mixtral
MAX_MESSAGE = 1 << 20
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OK = grpc.StatusCode.OK
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def shard(hf_models):
    ckpt, _ = hf_models("mixtral")
    spec = load_spec(ckpt)
    assert (spec.hidden_size, spec.moe.num_experts, spec.num_moe_layers) == (D, E, 2)
    server = ExpertServer(0, spec, ckpt, torch.float32, {layer: [(e, e) for e in range(E)] for layer in range(2)},
                          max_message_bytes=MAX_MESSAGE)
    channel = grpc.insecure_channel(server.address)
    raw = {m: channel.unary_unary(f"/{EXPERT_SERVICE}/{m}", request_serializer=lambda b: b,
                                  response_deserializer=getattr(pb, f"{m}Response").FromString)
           for m in ("Compute", "LoadSlots", "UnloadSlots", "Status")}
    yield dict(spec=spec, ckpt=ckpt, server=server, channel=channel, stub=pb_grpc.ExpertServiceStub(channel), raw=raw)
    channel.close()
    server.stop(0)


@pytest.fixture(scope="module")
def expected(shard):
    """The in-process grouped SwiGLU on weights read straight from the checkpoint."""
    spec, reader = shard["spec"], CheckpointReader(shard["ckpt"])
    inter = spec.moe.intermediate_size
    weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def w(layer: int, expert: int):
        if (layer, expert) not in weights:
            n = expert_names(spec.family, spec.moe_layers[layer], expert)
            g, u = reader.get(n.gate, (inter, D), torch.float32), reader.get(n.up, (inter, D), torch.float32)
            weights[layer, expert] = torch.cat([g, u], 0), reader.get(n.down, (D, inter), torch.float32).contiguous()
        return weights[layer, expert]

    def compute(layer: int, experts: list[int], counts: list[int], x: torch.Tensor) -> torch.Tensor:
        ws = [w(layer, e) for e in experts]
        return grouped_swiglu(x, counts, [a for a, _ in ws], [b for _, b in ws])

    return compute


def _x(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def _with(req: pb.ComputeRequest, **fields) -> pb.ComputeRequest:
    for k, v in fields.items():
        setattr(req, k, v)
    return req


def _rows(rows: list[int]) -> bytes:
    return torch.tensor(rows, dtype=torch.int32).numpy().tobytes()


def _request(x: torch.Tensor | None = None, *, slot_ids=(1,), counts=(4,), experts=None, moe_layer=0, epoch=0,
             dtype: str | None = None, shape=None, data: bytes | None = None) -> pb.ComputeRequest:
    """A Compute request: a real ``x`` by default, or a hand-made tensor (dtype, shape, bytes); ``experts``
    defaults to what the slots hold here (slot ``s`` holds expert ``s``)."""
    experts = [s if 0 <= s < E else 0 for s in slot_ids] if experts is None else experts
    req = compute_request(moe_layer=moe_layer, epoch=epoch, slot_ids=slot_ids, counts=counts, experts=experts)
    if dtype is None and shape is None and data is None:
        tensor_to_proto(_x(sum(counts)) if x is None else x, out=req.hidden)
    else:
        req.hidden.dtype = "float32" if dtype is None else dtype
        req.hidden.shape.extend([4, D] if shape is None else shape)
        req.hidden.data = b"\0" * (4 * 4 * D) if data is None else data
    return req


GOOD_SLOTS, GOOD_COUNTS = [0, 3, 5], [1, 3, 2]


def assert_good_compute(shard, expected, moe_layer: int = 1) -> None:
    """A good Compute (experts named, as routers send it) returns the in-process numbers exactly."""
    x = _x(6, seed=42)
    resp = shard["stub"].Compute(_request(x, slot_ids=GOOD_SLOTS, counts=GOOD_COUNTS, experts=GOOD_SLOTS,
                                          moe_layer=moe_layer, epoch=1), timeout=30)
    assert torch.equal(tensor_from_proto(resp.output), expected(moe_layer, GOOD_SLOTS, GOOD_COUNTS, x))
    assert resp.shard_id == 0


# -- checks of served (OK) cases -----------------------------------------------------------------

def _output(resp) -> torch.Tensor:
    return tensor_from_proto(resp.output)


def _exact(layer, experts, counts, x):
    def check(resp, expected):
        assert torch.equal(_output(resp), expected(layer, experts, counts, x))
    return check


def _empty(resp, expected):
    assert list(resp.output.shape) == [0, D] and resp.output.data == b""


_NONFINITE_X = _x(5, seed=7)
_NONFINITE_X[1, 3] = math.nan
_NONFINITE_X[3, 0] = math.inf
_NONFINITE_X[4, 63] = -math.inf


def _non_finite_rows_stay_there(resp, expected):
    out = _output(resp)
    want = expected(0, [2, 6], [2, 3], _NONFINITE_X)
    for row in (1, 3, 4):
        assert not torch.isfinite(out[row]).all()
    for row in (0, 2):
        assert torch.equal(out[row], want[row])


_X4 = _x(4, seed=3)
_X6 = _x(6, seed=5)


@dataclass
class Case:
    id: str
    make: Callable[[], pb.ComputeRequest | bytes]
    code: grpc.StatusCode
    needle: str = ""
    method: str = "Compute"
    check: Callable | None = None


CASES = [
    # -- hidden bytes vs dtype and shape ---------------------------------------------------------
    Case("bytes-short", lambda: _request(data=b"\0" * 1023), INVALID, "needs 1024 bytes, got 1023"),
    Case("bytes-long", lambda: _request(data=b"\0" * 1025), INVALID, "needs 1024 bytes, got 1025"),
    Case("bf16-declared-fp32-bytes", lambda: _request(dtype="bfloat16", data=b"\0" * 1024), INVALID,
         "tensor of shape [4, 64] and dtype bfloat16 needs 512 bytes, got 1024"),
    Case("fp32-declared-bf16-bytes", lambda: _request(data=b"\0" * 512), INVALID, "needs 1024 bytes, got 512"),
    Case("unknown-dtype", lambda: _request(dtype="float16", data=b"\0" * 512), INVALID,
         "unknown tensor dtype 'float16'; supported: bfloat16, float32"),
    Case("dtype-int64", lambda: _request(dtype="int64", data=b"\0" * 2048), INVALID, "unknown tensor dtype 'int64'"),
    Case("dtype-wrong-case", lambda: _request(dtype="Float32"), INVALID, "unknown tensor dtype 'Float32'"),
    Case("dtype-empty", lambda: _request(dtype=""), INVALID, "unknown tensor dtype ''"),
    Case("wrong-hidden-size", lambda: _request(shape=[4, 32], data=b"\0" * 512), INVALID,
         "hidden must have shape [N, 64], got [4, 32]"),
    Case("one-dim-hidden", lambda: _request(shape=[4 * D]), INVALID, "hidden must have shape [N, 64], got [256]"),
    Case("three-dim-hidden", lambda: _request(shape=[2, 2, D]), INVALID, "hidden must have shape [N, 64]"),
    Case("scalar-hidden", lambda: _request(shape=[], data=b"\0" * 4), INVALID,
         "hidden must have shape [N, 64], got []"),
    Case("negative-dim", lambda: _request(shape=[-4, D]), INVALID, "tensor shape [-4, 64] has a negative dimension"),
    Case("int64-min-dim", lambda: _request(shape=[-2**63, D]), INVALID, "negative dimension"),
    Case("huge-dims", lambda: _request(shape=[2**62, D]), INVALID,
         f"needs {2**62 * D * 4} bytes, got 1024"),
    Case("dims-overflowing-int64", lambda: _request(shape=[2**63 - 1, 2**63 - 1, 0], data=b""), INVALID,
         "is too large"),
    Case("zero-rows-huge-width", lambda: _request(shape=[0, 2**62], data=b"", counts=[0]), INVALID,
         f"hidden must have shape [N, 64], got [0, {2**62}]"),
    Case("hidden-missing", lambda: compute_request(moe_layer=0, slot_ids=[1], counts=[4]), INVALID,
         "hidden is missing"),
    # an empty message is wire version 0 (as is every sender from before versioning)
    Case("empty-request", lambda: b"", PRECONDITION,
         f"ComputeRequest of wire format version 0: this shard speaks version {EXPERT_WIRE_VERSION}"),
    Case("other-wire-version", lambda: _with(_request(), wire_version=EXPERT_WIRE_VERSION + 1), PRECONDITION,
         f"wire format version {EXPERT_WIRE_VERSION + 1}: this shard speaks version {EXPERT_WIRE_VERSION}"),
    # -- token_rows (each token once, a row index per (token, expert)) --------------------------------
    Case("token-rows-odd-bytes", lambda: _with(_request(), token_rows=b"\0" * 15), INVALID,
         "token_rows has 15 bytes; 4 rows need 16"),
    Case("token-rows-too-few", lambda: _with(_request(counts=(4,)), token_rows=_rows([0, 1, 2])), INVALID,
         "token_rows has 12 bytes; 4 rows need 16"),
    Case("token-rows-out-of-range", lambda: _with(_request(), token_rows=_rows([0, 1, 2, 4])), INVALID,
         "token_rows names row 4 of hidden, which has 4 rows"),
    Case("token-rows-negative", lambda: _with(_request(), token_rows=_rows([0, -1, 2, 3])), INVALID,
         "token_rows names row -1 of hidden"),
    # -- slots, experts, epochs ----------------------------------------------------------------------
    Case("slot-negative", lambda: _request(slot_ids=[-1]), INVALID, "slot id -1 is negative"),
    Case("slot-int64-min", lambda: _request(slot_ids=[3, -2**63], counts=[2, 2]), INVALID,
         f"slot id {-2**63} is negative"),
    Case("slot-beyond-the-shard", lambda: _request(slot_ids=[E]), NOT_FOUND,
         "slot 8 of MoE layer 0 is not loaded on shard 0"),
    Case("slot-int64-max", lambda: _request(slot_ids=[2**63 - 1], moe_layer=1), NOT_FOUND,
         f"slot {2**63 - 1} of MoE layer 1 is not loaded on shard 0"),
    Case("slot-holds-another-expert", lambda: _request(slot_ids=[1], experts=[2], epoch=6), NOT_FOUND,
         "slot 1 of MoE layer 0 holds expert(s) [1], not 2 (router placement epoch 6 is stale)"),
    Case("unknown-slot-named-expert", lambda: _request(slot_ids=[40], experts=[2], epoch=9), NOT_FOUND,
         "slot 40 of MoE layer 0 is not loaded on shard 0, not expert 2 (router placement epoch 9 is stale, or "
         "shard 0 lost"),
    Case("second-segment-stale", lambda: _request(slot_ids=[2, 4], counts=[2, 2], experts=[2, 5], epoch=3),
         NOT_FOUND, "slot 4 of MoE layer 0 holds expert(s) [4], not 5 (router placement epoch 3"),
    Case("old-epoch-right-experts", lambda: _request(_X4, slot_ids=[2, 4], counts=[1, 3], experts=[2, 4], epoch=0),
         OK, check=_exact(0, [2, 4], [1, 3], _X4)),
    Case("negative-epoch-right-experts", lambda: _request(_X4, slot_ids=[7], counts=[4], experts=[7], epoch=-5),
         OK, check=_exact(0, [7], [4], _X4)),
    Case("expert-out-of-range", lambda: _request(experts=[E]), INVALID, "logical expert 8 out of range [0, 8)"),
    Case("expert-negative", lambda: _request(experts=[-1]), INVALID, "logical expert -1 out of range [0, 8)"),
    Case("moe-layer-out-of-range", lambda: _request(moe_layer=2), INVALID, "moe_layer 2 out of range [0, 2)"),
    Case("moe-layer-int32-min", lambda: _request(moe_layer=-2**31), INVALID, "moe_layer -2147483648 out of range"),
    # -- array lengths and counts ------------------------------------------------------------------------
    Case("slots-vs-counts", lambda: _request(slot_ids=[1, 2], counts=[4]), INVALID,
         "slot_ids has 2 entries but counts has 1"),
    Case("counts-vs-slots", lambda: _request(slot_ids=[1], counts=[2, 2]), INVALID,
         "slot_ids has 1 entries but counts has 2"),
    Case("experts-vs-slots", lambda: _request(slot_ids=[1], experts=[1, 2]), INVALID,
         "experts has 2 entries but slot_ids has 1"),
    Case("experts-missing", lambda: _request(slot_ids=[1], experts=[]), INVALID,
         "experts has 0 entries but slot_ids has 1 (name the logical expert expected in each slot)"),
    Case("counts-over-rows", lambda: _request(_x(4), counts=[5]), INVALID, "counts sum to 5 but hidden has 4 rows"),
    Case("counts-under-rows", lambda: _request(_x(4), slot_ids=[1, 2], counts=[1, 2]), INVALID,
         "counts sum to 3 but hidden has 4 rows"),
    Case("count-negative", lambda: _request(_x(4), slot_ids=[1, 2], counts=[5, -1]), INVALID, "non-negative"),
    Case("count-int64-max", lambda: _request(_x(4), counts=[2**63 - 1]), INVALID,
         f"counts sum to {2**63 - 1} but hidden has 4 rows"),
    # -- bytes that are not a valid message, size ------------------------------------------------------------
    Case("garbage-bytes", lambda: b"\xff\xff\xff\xff", INVALID, "not a valid moeyard.v1.ComputeRequest message"),
    Case("truncated", lambda: _request(_x(4)).SerializeToString()[:-7], INVALID, "not a valid"),
    Case("dtype-invalid-utf8", lambda: b"\x2a\x04\x0a\x02\xff\xfe", INVALID, "UTF-8"),
    Case("load-slots-garbage", lambda: b"\x0a\x05\x08", INVALID, "not a valid moeyard.v1.LoadSlotsRequest message",
         method="LoadSlots"),
    Case("unload-slots-garbage", lambda: b"\xff", INVALID, "not a valid moeyard.v1.UnloadSlotsRequest message",
         method="UnloadSlots"),
    Case("oversized-message", lambda: _request(_x(MAX_MESSAGE // (4 * D) + 1),
                                               counts=[MAX_MESSAGE // (4 * D) + 1]),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    # -- served ---------------------------------------------------------------------------------------------------
    Case("empty-batch", lambda: _request(shape=[0, D], data=b"", slot_ids=[], counts=[]), OK, check=_empty),
    Case("zero-count-segment", lambda: _request(_X4, slot_ids=[1, 2], counts=[0, 4], experts=[1, 2]), OK,
         check=_exact(0, [1, 2], [0, 4], _X4)),
    Case("nan-and-inf-in-hidden", lambda: _request(_NONFINITE_X, slot_ids=[2, 6], counts=[2, 3]), OK,
         check=_non_finite_rows_stay_there),
    Case("unsorted-and-repeated-slots",
         lambda: _request(_X6, slot_ids=[5, 1, 5], counts=[2, 3, 1], experts=[5, 1, 5], moe_layer=1), OK,
         check=_exact(1, [5, 1, 5], [2, 3, 1], _X6)),
    Case("unknown-fields", lambda: _request(_X4, slot_ids=[3], counts=[4]).SerializeToString()
         + b"\xa0\x06\x07" + b"\xaa\x06\x03abc", OK, check=_exact(0, [3], [4], _X4)),
]


def _call(shard, case: Case):
    msg = case.make()
    if isinstance(msg, bytes):
        return shard["raw"][case.method](msg, timeout=30)
    return getattr(shard["stub"], case.method)(msg, timeout=30)


def test_table_has_enough_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_expert_message(shard, expected, case):
    before = shard["server"].status()["slots"]
    try:
        resp, code, details = _call(shard, case), OK, ""
    except grpc.RpcError as e:
        resp, code, details = None, e.code(), e.details() or ""
    assert code == case.code, f"{case.id}: {code} {details!r}"
    if code == OK:
        case.check(resp, expected)
    else:
        assert details.strip() and case.needle in details, details
    assert shard["server"].status()["slots"] == before
    assert_good_compute(shard, expected)


def test_a_router_on_a_stale_epoch_is_refused_after_a_move(shard, expected):
    """Slot 5 moves from expert 5 to expert 7 (placement epoch 4): a router still on epoch 3 names
    expert 5 and gets NOT_FOUND naming its epoch; epoch 4 gets expert 7's numbers."""
    stub, x = shard["stub"], _x(3, seed=9)
    stub.LoadSlots(pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=0, slot=5, expert=7)]), timeout=30)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.Compute(_request(x, slot_ids=[5], counts=[3], experts=[5], epoch=3), timeout=30)
        assert e.value.code() == NOT_FOUND
        assert e.value.details() == ("slot 5 of MoE layer 0 holds expert(s) [7], not 5 "
                                     "(router placement epoch 3 is stale)")
        out = stub.Compute(_request(x, slot_ids=[5], counts=[3], experts=[7], epoch=4), timeout=30)
        assert torch.equal(_output(out), expected(0, [7], [3], x))
    finally:
        stub.LoadSlots(pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=0, slot=5, expert=5)]), timeout=30)
    assert_good_compute(shard, expected, moe_layer=0)


def test_after_the_table_the_shard_is_healthy_and_unchanged(shard, expected):
    health = health_pb2_grpc.HealthStub(shard["channel"])
    for service in ("", EXPERT_SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    st = shard["stub"].Status(pb.StatusRequest(), timeout=10)
    assert [list(zip(ls.slot_ids, ls.experts)) for ls in st.layers] == [[(e, e) for e in range(E)]] * 2
    assert st.requests > len(CASES)
    assert_good_compute(shard, expected, moe_layer=0)
