"""Tensors on the wire: ``torch.Tensor`` <-> ``moeyard.v1.Tensor`` (raw bytes).

A wire tensor is ``dtype`` ("bfloat16" or "float32"), ``shape`` and the
row-major element bytes in little-endian order (every supported host is
little-endian). Encoding costs one copy (``bytes`` must own its data);
decoding is zero-copy past the protobuf runtime: the tensor is a view of the
``bytes`` object the message hands out (upb copies the field once on access).

Decoded tensors share memory with an immutable ``bytes`` object: read them,
copy them, convert them, but do not modify them in place.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeyard.expert_actors.frames import Decoded, decode, encode
from moeyard.v1 import expert_pb2 as pb

WIRE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}



@functools.cache
def _spend_frombuffer_warning() -> None:
    """torch.frombuffer warns once per process (TORCH_WARN_ONCE) that a bytes object is read-only;
    that is the point of the zero-copy decode, and decoded tensors are never written to in place.
    Spend that one warning silenced (on the first decode, not at import), without touching the
    global warning filters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0\0\0\0", dtype=torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """Wire name of a torch dtype; ValueError for a dtype the wire does not carry."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be sent on the wire; supported: "
                         f"{', '.join(WIRE_DTYPES)}") from None


def wire_dtype(name: str) -> torch.dtype:
    """Torch dtype of a wire name; ValueError for an unknown name."""
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {name!r}; supported: {', '.join(WIRE_DTYPES)}") from None


def tensor_to_proto(t: torch.Tensor, dtype: torch.dtype | None = None, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode ``t`` (cast to ``dtype`` first when given) as a wire tensor.

    ``out`` (e.g. ``request.hidden``) is filled in place instead of building a new message.
    """
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    name = dtype_name(t.dtype)
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    msg = pb.Tensor() if out is None else out
    msg.dtype = name
    del msg.shape[:]
    msg.shape.extend(t.shape)
    msg.data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return msg


def tensor_from_bytes(dtype: str, shape: Sequence[int], data: bytes | memoryview, copy: bool = False) -> torch.Tensor:
    """Decode raw wire bytes; the result is a view of ``data`` unless ``copy`` (or unless ``data`` is not
    aligned to the dtype's size, which it then copies).

    Raises ValueError when the dtype is unknown, a dimension is negative, or the
    byte count does not match ``prod(shape) * itemsize``.
    """
    dt = wire_dtype(dtype)
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    itemsize = dt.itemsize
    numel = math.prod(shape)
    if len(data) != numel * itemsize:
        raise ValueError(f"tensor of shape {shape} and dtype {dtype} needs {numel * itemsize} bytes, "
                         f"got {len(data)}")
    if numel == 0:
        try:
            return torch.empty(shape, dtype=dt, device="cpu")
        except RuntimeError as e:  # e.g. [2**62, 2**62, 0]: torch's size arithmetic overflows
            raise ValueError(f"tensor shape {shape} is too large: {e}") from None
    _spend_frombuffer_warning()
    t = torch.frombuffer(data, dtype=dt).view(shape)
    return t.clone() if copy or t.data_ptr() % itemsize else t


def tensor_from_proto(msg: pb.Tensor, copy: bool = False) -> torch.Tensor:
    """Decode a wire tensor (see :func:`tensor_from_bytes`); zero-copy unless ``copy``."""
    # upb hands out a fresh bytes object on every access of a bytes field: read it once
    return tensor_from_bytes(msg.dtype, msg.shape, msg.data, copy)


def rows_from_bytes(data: bytes | memoryview, num_rows: int, num_hidden: int) -> torch.Tensor:
    """Decode ``ComputeRequest.token_rows`` (``[N]`` int32 on the host, a view of ``data``: ``index_select``
    takes it as it is). ValueError when the bytes are not ``num_rows`` int32 values or one is outside
    ``[0, num_hidden)``."""
    if len(data) != 4 * num_rows:
        raise ValueError(f"token_rows has {len(data)} bytes; {num_rows} rows need {4 * num_rows} "
                         "(one little-endian int32 each)")
    if num_rows == 0:
        return torch.empty(0, dtype=torch.int32)
    _spend_frombuffer_warning()
    rows = torch.frombuffer(data, dtype=torch.int32)
    if rows.data_ptr() % 4:
        rows = rows.clone()
    lo, hi = (int(v) for v in torch.aminmax(rows))
    if lo < 0 or hi >= num_hidden:
        raise ValueError(f"token_rows names row {lo if lo < 0 else hi} of hidden, which has {num_hidden} rows")
    return rows


def host_bytes(t: torch.Tensor) -> memoryview:
    """The element bytes of host tensor ``t`` (row-major), a view unless ``t`` is not contiguous."""
    if t.device.type != "cpu":
        raise ValueError(f"host_bytes needs a tensor in host memory, not on {t.device}")
    flat = t.detach().reshape(-1)
    if not flat.numel():
        return memoryview(b"")
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


_REQ_HIDDEN = pb.ComputeRequest.DESCRIPTOR.fields_by_name["hidden"].number
_REQ_ROWS = pb.ComputeRequest.DESCRIPTOR.fields_by_name["token_rows"].number
_RESP_OUTPUT = pb.ComputeResponse.DESCRIPTOR.fields_by_name["output"].number


@dataclass(frozen=True)
class ComputeCall:
    """A ``ComputeRequest`` to send: ``message`` without its hidden states and token rows, and those as
    host tensors (``hidden [U, D]`` in its wire dtype, ``token_rows [N]`` int32 or None)."""

    message: pb.ComputeRequest
    hidden: torch.Tensor
    token_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class ComputeResult:
    """A ``ComputeResponse`` to send: ``message`` without its output, and the output ``[N, D]`` (host)."""

    message: pb.ComputeResponse
    output: torch.Tensor


def encode_compute_request(call: ComputeCall) -> bytes:
    """The request's bytes, the hidden states and token rows copied once (``frames.encode``)."""
    msg = call.message
    msg.hidden.dtype = dtype_name(call.hidden.dtype)
    del msg.hidden.shape[:]
    msg.hidden.shape.extend(call.hidden.shape)
    msg.ClearField("token_rows")
    rows = () if call.token_rows is None else ((_REQ_ROWS, host_bytes(call.token_rows.to(torch.int32))),)
    return encode(msg, _REQ_HIDDEN, host_bytes(call.hidden), rows)


def encode_compute_response(result: ComputeResult) -> bytes:
    """The response's bytes, the output copied once (``frames.encode``)."""
    msg = result.message
    msg.output.dtype = dtype_name(result.output.dtype)
    del msg.output.shape[:]
    msg.output.shape.extend(result.output.shape)
    return encode(msg, _RESP_OUTPUT, host_bytes(result.output))


def decode_compute_request(raw: bytes) -> Decoded[pb.ComputeRequest]:
    """A ``ComputeRequest`` with ``payload`` the hidden states' bytes and ``blobs`` holding ``token_rows``
    (views of ``raw``). ``DecodeError`` when it does not parse."""
    return decode(raw, pb.ComputeRequest, _REQ_HIDDEN, (_REQ_ROWS,))


def request_token_rows(req: Decoded[pb.ComputeRequest]) -> memoryview:
    """The ``token_rows`` bytes of a decoded request (empty when absent)."""
    return req.blobs.get(_REQ_ROWS, memoryview(b""))


def decode_compute_response(raw: bytes) -> Decoded[pb.ComputeResponse]:
    """A ``ComputeResponse`` with ``payload`` the output's bytes (a view of ``raw``)."""
    return decode(raw, pb.ComputeResponse, _RESP_OUTPUT)


def status_to_dict(resp: pb.StatusResponse) -> dict:
    """A Status reply in the shape of :meth:`ExpertServer.status`."""
    return dict(shard_id=resp.shard_id, address=resp.address, pid=resp.pid, dtype=resp.dtype,
                slots={ls.moe_layer: list(zip(ls.slot_ids, ls.experts)) for ls in resp.layers},
                weight_bytes=resp.weight_bytes, rss_bytes=resp.rss_bytes, num_threads=resp.num_threads,
                requests=resp.requests, tokens=resp.tokens, compute_seconds=resp.compute_seconds,
                last_epoch=resp.last_epoch)
