"""Messages framed by hand (expert_actors/frames.py): valid protobuf for any parser, payload copied once
on encode and not at all on decode, aligned, and malformed bytes refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError

from moeyard.expert_actors import frames
from moeyard.expert_actors.frames import ALIGN, decode, encode
from moeyard.expert_actors.wire import (
    ComputeCall,
    ComputeResult,
    decode_compute_request,
    decode_compute_response,
    encode_compute_request,
    encode_compute_response,
    request_token_rows,
    rows_from_bytes,
    tensor_from_bytes,
    tensor_from_proto,
    tensor_to_proto,
)
from moeyard.v1 import expert_pb2 as pb


@pytest.fixture(params=["walk", "protobuf"])
def decoder(request, monkeypatch):
    """Both ways :func:`decode` reads a message: walking its fields (large messages) or by protobuf (small)."""
    monkeypatch.setattr(frames, "SMALL_BYTES", 0 if request.param == "walk" else 1 << 30)
    return request.param


def _hidden(rows: int, width: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(rows * 31 + width)).to(dtype)


def _address(buf: bytes) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, width", [(1, 8), (5, 1024), (3, 7), (0, 16)])
def test_a_framed_request_is_the_message_protobuf_would_send(dtype, rows, width):
    x = _hidden(rows, width, dtype)
    token_rows = torch.arange(2 * rows, dtype=torch.int32) % max(rows, 1)
    call = ComputeCall(pb.ComputeRequest(moe_layer=3, epoch=9, slot_ids=[1, 4], counts=[rows, rows],
                                         experts=[1, 0], wire_version=2), x, token_rows if rows else None)
    raw = encode_compute_request(call)
    stock = pb.ComputeRequest.FromString(raw)         # any protobuf parser reads it
    want = pb.ComputeRequest(moe_layer=3, epoch=9, slot_ids=[1, 4], counts=[rows, rows], experts=[1, 0],
                             wire_version=2, token_rows=token_rows.numpy().tobytes() if rows else b"")
    tensor_to_proto(x, out=want.hidden)
    stock.ClearField("pad")
    assert stock == want
    assert torch.equal(tensor_from_proto(stock.hidden), x)


@pytest.mark.parametrize("rows, width", [(4, 64), (33, 1024), (1, 3)])
def test_decoding_views_the_received_bytes_aligned(rows, width, monkeypatch):
    monkeypatch.setattr(frames, "SMALL_BYTES", 0)
    x = _hidden(rows, width)
    raw = encode_compute_request(ComputeCall(pb.ComputeRequest(moe_layer=1, counts=[rows], wire_version=2), x))
    req = decode_compute_request(raw)
    assert req.payload_offset % ALIGN == 0
    assert req.payload.obj is raw                      # a view, not a copy
    t = tensor_from_bytes(req.message.hidden.dtype, req.message.hidden.shape, req.payload)
    assert t.data_ptr() == _address(raw) + req.payload_offset
    assert t.data_ptr() % 16 == 0                      # CPython's bytes data is 16-aligned
    assert torch.equal(t, x)
    assert req.message.moe_layer == 1 and list(req.message.counts) == [rows]
    assert not req.message.hidden.data and not req.message.pad


def test_decoding_a_stock_message_gives_the_same_request(decoder):
    x = _hidden(6, 32)
    msg = pb.ComputeRequest(moe_layer=2, counts=[6], wire_version=2, token_rows=bytes(range(8)))
    tensor_to_proto(x, out=msg.hidden)
    raw = msg.SerializeToString()
    req = decode_compute_request(raw)
    assert torch.equal(tensor_from_bytes("bfloat16", [6, 32], req.payload), x)
    assert bytes(request_token_rows(req)) == bytes(range(8))
    assert req.message.moe_layer == 2 and list(req.message.hidden.shape) == [6, 32]


def test_protobuf_merge_rules_hold(decoder):
    """Occurrences of the tensor field merge (the shape appends), the last bytes value wins."""
    a = pb.ComputeRequest(moe_layer=1, token_rows=b"old!")
    a.hidden.dtype = "float32"
    a.hidden.shape.append(2)
    b = pb.ComputeRequest(token_rows=b"new!")
    b.hidden.shape.append(1)
    b.hidden.data = b"\0" * 8
    raw = a.SerializeToString() + b.SerializeToString()
    want = pb.ComputeRequest.FromString(raw)
    got = decode_compute_request(raw)
    assert list(got.message.hidden.shape) == list(want.hidden.shape) == [2, 1]
    assert bytes(got.payload) == want.hidden.data and bytes(request_token_rows(got)) == b"new!"


def test_a_request_without_hidden_has_no_tensor(decoder):
    req = decode_compute_request(pb.ComputeRequest(moe_layer=1).SerializeToString())
    assert not req.message.HasField("hidden") and len(req.payload) == 0
    req = decode_compute_request(pb.ComputeRequest(hidden=pb.Tensor()).SerializeToString())
    assert req.message.HasField("hidden")


def test_a_framed_response_round_trips(decoder):
    y = _hidden(9, 48, torch.float32)
    raw = encode_compute_response(ComputeResult(pb.ComputeResponse(compute_seconds=0.5, shard_id=3), y))
    stock = pb.ComputeResponse.FromString(raw)
    assert stock.shard_id == 3 and torch.equal(tensor_from_proto(stock.output), y)
    resp = decode_compute_response(raw)
    assert resp.message.compute_seconds == 0.5
    assert resp.payload_offset % ALIGN == 0 if decoder == "walk" else resp.payload_offset == -1
    assert torch.equal(tensor_from_bytes(resp.message.output.dtype, resp.message.output.shape, resp.payload), y)


def test_unaligned_payloads_are_copied_not_misread():
    raw = b"\0" + torch.arange(4, dtype=torch.float32).numpy().tobytes()
    t = tensor_from_bytes("float32", [4], memoryview(raw)[1:])
    assert t.data_ptr() % 4 == 0 and torch.equal(t, torch.arange(4, dtype=torch.float32))
    rows = rows_from_bytes(memoryview(b"\0" + torch.tensor([2, 0, 1], dtype=torch.int32).numpy().tobytes())[1:],
                           3, 3)
    assert rows.data_ptr() % 4 == 0 and rows.tolist() == [2, 0, 1]


def test_encode_aligns_whatever_the_header_length(decoder):
    for n in range(0, 200, 7):
        head = pb.ComputeRequest(slot_ids=list(range(n)), wire_version=2)
        raw = encode(head, 5, b"\1" * 10)
        d = decode(raw, pb.ComputeRequest, 5)
        assert d.payload_offset % ALIGN == 0 if decoder == "walk" else d.payload_offset == -1
        assert bytes(d.payload) == b"\1" * 10
        assert list(d.message.slot_ids) == list(range(n))


@pytest.mark.parametrize("raw, match", [
    (b"\x08", "truncated varint"),
    (b"\x2a\x10\x1a\x02ab", "runs past the end"),            # hidden says 16 bytes, has 4
    (b"\x2a\x04\x1a\x09ab", "runs past the end"),            # data inside hidden too long
    (b"\x0b\x0c", "wire type 3"),                            # a group
    (b"\x00\x01", "field number 0"),
    (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
])
def test_malformed_bytes_raise_decode_error(raw, match, decoder):
    if decoder == "protobuf":
        if raw == b"\x0b\x0c":  # protobuf keeps an empty group as an unknown field; the walker refuses groups
            assert decode_compute_request(raw).message.moe_layer == 0
            return
        match = None  # protobuf's own messages
    with pytest.raises(DecodeError, match=match):
        decode_compute_request(raw)
