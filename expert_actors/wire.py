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

import torch

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


def tensor_from_bytes(dtype: str, shape: Sequence[int], data: bytes, copy: bool = False) -> torch.Tensor:
    """Decode raw wire bytes; the result is a view of ``data`` unless ``copy``.

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
    return t.clone() if copy else t


def tensor_from_proto(msg: pb.Tensor, copy: bool = False) -> torch.Tensor:
    """Decode a wire tensor (see :func:`tensor_from_bytes`); zero-copy unless ``copy``."""
    # upb hands out a fresh bytes object on every access of a bytes field: read it once
    return tensor_from_bytes(msg.dtype, msg.shape, msg.data, copy)


def rows_to_bytes(rows: torch.Tensor) -> bytes:
    """``ComputeRequest.token_rows``: ``rows [N]`` as little-endian int32 bytes."""
    flat = rows.detach().reshape(-1).to(device="cpu", dtype=torch.int32)
    return flat.numpy().tobytes() if flat.numel() else b""


def rows_from_bytes(data: bytes, num_rows: int, num_hidden: int) -> torch.Tensor:
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
    lo, hi = (int(v) for v in torch.aminmax(rows))
    if lo < 0 or hi >= num_hidden:
        raise ValueError(f"token_rows names row {lo if lo < 0 else hi} of hidden, which has {num_hidden} rows")
    return rows


def status_to_dict(resp: pb.StatusResponse) -> dict:
    """A Status reply in the shape of :meth:`ExpertServer.status`."""
    return dict(shard_id=resp.shard_id, address=resp.address, pid=resp.pid, dtype=resp.dtype,
                slots={ls.moe_layer: list(zip(ls.slot_ids, ls.experts)) for ls in resp.layers},
                weight_bytes=resp.weight_bytes, rss_bytes=resp.rss_bytes, num_threads=resp.num_threads,
                requests=resp.requests, tokens=resp.tokens, compute_seconds=resp.compute_seconds,
                last_epoch=resp.last_epoch)
