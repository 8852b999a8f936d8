"""Tensors on the wire: exact round trips, clear errors for malformed messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeyard.expert_actors.wire import dtype_name, tensor_from_bytes, tensor_from_proto, tensor_to_proto, wire_dtype
from moeyard.v1 import expert_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 64), (1, 3), (0, 16), (5,), (2, 3, 4)])
def test_round_trip_is_exact(dtype, shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    msg = tensor_to_proto(t)
    assert msg.dtype == dtype_name(dtype) and list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    assert torch.equal(tensor_from_proto(msg, copy=True), t)


def test_round_trip_of_a_non_contiguous_view():
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    view = base.t()[::2]  # [4, 6], strided
    assert torch.equal(tensor_from_proto(tensor_to_proto(view)), view)


def test_cast_on_encode_and_bit_layout():
    t = torch.tensor([[1.0, -2.5, 3.140625]])
    msg = tensor_to_proto(t, torch.bfloat16)
    assert msg.dtype == "bfloat16" and len(msg.data) == 6
    assert msg.data == t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    assert torch.equal(tensor_from_proto(msg).float(), t)  # all three are exact in bf16
    f32 = tensor_to_proto(t)
    assert f32.data == t.numpy().astype("<f4").tobytes()  # raw little-endian float32


def test_fill_in_place():
    req = pb.ComputeRequest(moe_layer=1)
    tensor_to_proto(torch.ones(2, 2), out=req.hidden)
    tensor_to_proto(torch.zeros(3), out=req.hidden)  # shape is replaced, not appended to
    assert list(req.hidden.shape) == [3] and len(req.hidden.data) == 12


def test_decode_is_a_zero_copy_view_of_the_bytes():
    ref = torch.arange(8, dtype=torch.float32).view(2, 4)
    data = tensor_to_proto(ref).data
    t = tensor_from_bytes("float32", [2, 4], data)
    assert t.data_ptr() == np.frombuffer(data, dtype=np.uint8).ctypes.data
    assert torch.equal(t, ref)
    c = tensor_from_bytes("float32", [2, 4], data, copy=True)
    assert c.data_ptr() != t.data_ptr() and torch.equal(c, ref)


@pytest.mark.parametrize("msg, match", [
    (pb.Tensor(dtype="float16", shape=[2], data=b"\0" * 4), "unknown tensor dtype 'float16'"),
    (pb.Tensor(dtype="", shape=[2], data=b"\0" * 8), "unknown tensor dtype ''"),
    (pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), r"needs 24 bytes, got 20"),
    (pb.Tensor(dtype="bfloat16", shape=[4], data=b"\0" * 16), r"needs 8 bytes, got 16"),
    (pb.Tensor(dtype="float32", shape=[0, 4], data=b"\0" * 4), r"needs 0 bytes, got 4"),
    (pb.Tensor(dtype="float32", shape=[-1, 2], data=b"\0" * 8), "negative dimension"),
])
def test_malformed_messages_raise_value_error(msg, match):
    with pytest.raises(ValueError, match=match):
        tensor_from_proto(msg)


def test_unsupported_dtype_on_encode():
    with pytest.raises(ValueError, match="cannot be sent on the wire"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="cannot be sent on the wire"):
        tensor_to_proto(torch.zeros(2), torch.int64)
    assert wire_dtype("bfloat16") is torch.bfloat16
