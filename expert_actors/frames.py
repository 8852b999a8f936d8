"""Messages whose one large tensor travels past protobuf's copies.

A ``ComputeRequest`` or ``ComputeResponse`` is a few hundred bytes of header
and one tensor of up to megabytes. Built the plain way, the tensor is copied
into a ``bytes`` object, again into the message and a third time when the
message is serialized; parsed the plain way, once into the message and again
when the field is read (measured: 5.7 ms for a [256, 7168] bf16 request, 0.3 ms
this way). Like TensorFlow's ``grpc_tensor_coding``, the tensor's bytes are
instead written by hand after the header, as one more occurrence of the tensor
field holding only its ``data``:

    header.SerializeToString()            the message without the tensor's data (dtype and shape set)
    [field B: blob]...                    small bytes fields (``token_rows``), when given
    field 15 ``pad``: zero bytes          so the payload starts at a multiple of ``ALIGN`` in the message
    field T { field 3 ``data``: payload } merged into the tensor field by any protobuf parser

That is a valid protobuf message (a repeated embedded message is merged, a
repeated bytes field's last value wins), so a stock parser reads it. Encoding
costs one copy of the payload (into the ``bytes`` gRPC sends), decoding none:
:func:`decode` walks the fields, parses everything but the payload with
protobuf, and returns the payload as a view of the received ``bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

SMALL_BYTES = 192 << 10
"""Below this, :func:`decode` lets protobuf parse the whole message: two copies of a small payload cost
less than walking the fields in Python (measured crossing over between 128 and 256 KiB)."""
ALIGN = 64
"""Payload offset in the message is a multiple of this (received ``bytes`` data is 16-aligned in CPython)."""
PAD_FIELD = 15
DATA_FIELD = 3
"""``Tensor.data``."""

_LEN = 2
M = TypeVar("M", bound=Message)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field_no: int) -> bytes:
    return _varint(field_no << 3 | _LEN)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """Top-level fields of ``buf[start:end]``: ``(field, wire type, field start, value start, value end)``."""
    pos = start
    while pos < end:
        fstart = pos
        key, pos = _read_varint(buf, pos, end)
        fno, wt = key >> 3, key & 7
        if fno == 0:
            raise DecodeError("field number 0")
        if wt == 0:
            _, vend = _read_varint(buf, pos, end)
        elif wt == 1:
            vend = pos + 8
        elif wt == 5:
            vend = pos + 4
        elif wt == _LEN:
            n, pos = _read_varint(buf, pos, end)
            vend = pos + n
        else:
            raise DecodeError(f"field {fno} has wire type {wt} (groups are not used here)")
        if vend > end:
            raise DecodeError(f"field {fno} runs past the end of the message")
        yield fno, wt, fstart, pos, vend
        pos = vend


def encode(header: Message, tensor_field: int, payload: memoryview | bytes,
           blobs: Sequence[tuple[int, memoryview | bytes]] = ()) -> bytes:
    """``header`` (its tensor's dtype and shape set, no data) followed by ``blobs`` (bytes fields) and
    ``payload`` as the data of field ``tensor_field``; one copy of each buffer (see the module docstring).

    ``payload`` and the blobs are any contiguous buffers (e.g. ``memoryview(array)``); they are read
    before this returns."""
    parts: list[bytes | memoryview] = [header.SerializeToString()]
    for fno, blob in blobs:
        if len(blob):
            parts += [_key(fno), _varint(len(blob)), blob]
    n = len(payload)
    inner = _key(DATA_FIELD) + _varint(n)
    frame = _key(tensor_field) + _varint(len(inner) + n) + inner
    before = sum(len(p) for p in parts) + len(frame) + 2   # + the pad field's key and 1-byte length
    pad = -before % ALIGN
    parts += [_key(PAD_FIELD), _varint(pad), bytes(pad), frame, payload]
    return b"".join(parts)


@dataclass
class Decoded(Generic[M]):
    """A message decoded by :func:`decode`: ``message`` without the payload and the blobs; ``payload`` and
    ``blobs[field]`` views of the received bytes (empty when absent)."""

    message: M
    payload: memoryview
    payload_offset: int
    """Where ``payload`` starts in the received bytes (its alignment); -1 for a small message, whose
    payload protobuf copied into a ``bytes`` of its own."""
    blobs: dict[int, memoryview] = field(default_factory=dict)


def decode(raw: bytes, message_cls: type[M], tensor_field: int, blob_fields: Sequence[int] = ()) -> Decoded[M]:
    """Parse any encoding of ``message_cls`` (this module's or protobuf's own) without copying the data of
    its tensor field ``tensor_field`` or its bytes fields ``blob_fields``. As protobuf does, the last
    occurrence of a bytes field wins and occurrences of the tensor field merge.

    Raises ``DecodeError`` when the bytes are not a valid message."""
    buf = memoryview(raw)
    end = len(buf)
    if end < SMALL_BYTES:
        return _decode_small(raw, message_cls, tensor_field, blob_fields)
    keep: list[memoryview] = []
    tensor_rest: list[memoryview] = []
    has_tensor = False
    data = (0, 0)
    blobs: dict[int, tuple[int, int]] = {}
    for fno, wt, fstart, vstart, vend in _fields(buf, 0, end):
        if wt == _LEN and fno == tensor_field:
            has_tensor = True
            for gno, gwt, gstart, gvstart, gvend in _fields(buf, vstart, vend):
                if gwt == _LEN and gno == DATA_FIELD:
                    data = (gvstart, gvend)
                else:
                    tensor_rest.append(buf[gstart:gvend])
        elif wt == _LEN and fno in blob_fields:
            blobs[fno] = (vstart, vend)
        elif wt == _LEN and fno == PAD_FIELD:
            continue
        else:
            keep.append(buf[fstart:vend])
    msg = message_cls.FromString(b"".join(keep))
    if has_tensor:
        sub = getattr(msg, message_cls.DESCRIPTOR.fields_by_number[tensor_field].name)
        sub.SetInParent()
        if tensor_rest:
            sub.MergeFromString(b"".join(tensor_rest))
    return Decoded(msg, buf[data[0]:data[1]], data[0], {f: buf[s:e] for f, (s, e) in blobs.items()})


def _decode_small(raw: bytes, message_cls: type[M], tensor_field: int, blob_fields: Sequence[int]) -> Decoded[M]:
    """:func:`decode` by protobuf itself (the payload and blobs copied out of the message)."""
    msg = message_cls.FromString(raw)
    by_number = message_cls.DESCRIPTOR.fields_by_number
    blobs = {fno: memoryview(getattr(msg, by_number[fno].name)) for fno in blob_fields}
    sub = getattr(msg, by_number[tensor_field].name)
    # the copies of the payload and blobs stay in the message too (clearing them costs more than they do)
    return Decoded(msg, memoryview(sub.data), -1, blobs)
