"""The expert transport over gRPC: one ``Compute`` call per shard batch.

:class:`GrpcTransport` implements the same ``submit(moe_layer, batches, epoch)
-> Future[list[Tensor]]`` as :class:`~moeyard.router_service.transport.InProcessTransport`.
Every batch of a layer goes out at once (``stub.Compute.future``), over one
channel per shard that stays open between steps; the combined future resolves
when the last answer arrives, with the outputs in batch order and in each
input's dtype.

Each request names the logical expert the router expects in every slot
(``ShardBatch.experts``), so a shard that holds something else refuses rather
than answering with another expert's output.

Failures: a shard that cannot be reached (``UNAVAILABLE`` — down, connection
refused, restarting — ``DEADLINE_EXCEEDED`` or ``CANCELLED``) fails the future
with :class:`~moeyard.router_service.transport.ShardUnavailable` naming the shard, at
the first such answer (the other calls of the layer are cancelled). A shard
that answers ``NOT_FOUND`` (a slot that does not hold the expected expert: the
router's placement is stale, or the shard lost slots in a restart) fails it
with :class:`~moeyard.router_service.transport.StalePlacement` (a
``ShardUnavailable``). Any other error answer (``INVALID_ARGUMENT``,
``FAILED_PRECONDITION``, ``INTERNAL``) fails it with :class:`ShardCallError`.
After a Ray actor restart the shard listens on a new port: call
:meth:`GrpcTransport.refresh` so the next call re-resolves its address.

Precision of ``wire_dtype=torch.bfloat16`` for fp32 compute: the hidden states
are rounded to bf16 before sending (8 significant bits, relative error up to
2**-9 ≈ 0.2% per element), the shard computes in its own dtype on those
rounded inputs, and the outputs come back rounded to bf16 again; half the bytes
on the wire, but results no longer match fp32 bit for bit (greedy tokens may
diverge after a few steps). The default sends each hidden in its own dtype.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeyard.expert_actors.wire import (
    ComputeCall,
    decode_compute_response,
    dtype_name,
    encode_compute_request,
    status_to_dict,
    tensor_from_bytes,
)
from moeyard.router_service.transport import LayerOutputs, ShardBatch, ShardUnavailable, StalePlacement
from moeyard.rpc import EXPERT_MAX_MESSAGE_BYTES, EXPERT_WIRE_VERSION, grpc_options
from moeyard.v1 import expert_pb2 as pb
from moeyard.v1 import expert_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class WireStats:
    """What :meth:`GrpcTransport.submit` has sent since the transport was made (monotonic counters).

    ``hidden_bytes``: hidden states, each token once per shard; ``index_bytes``: the ``token_rows``
    naming a row per (token, expert); ``per_assignment_bytes``: what the hidden states would have
    cost sent once per (token, expert), as before wire version 2."""

    calls: int = 0
    layers: int = 0
    hidden_bytes: int = 0
    index_bytes: int = 0
    per_assignment_bytes: int = 0

    @property
    def sent_bytes(self) -> int:
        return self.hidden_bytes + self.index_bytes


UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.CANCELLED})


class ShardCallError(RuntimeError):
    """A shard answered a call with an error (not an outage); ``.shard``, ``.code`` and ``.details`` say which."""

    def __init__(self, shard: int, code: grpc.StatusCode, details: str):
        super().__init__(f"expert shard {shard} refused the call ({code.name}): {details}")
        self.shard = shard
        self.code = code
        self.details = details

    def __reduce__(self):
        return (type(self), (self.shard, self.code, self.details))


def shard_error(shard: int, err: grpc.RpcError) -> Exception:
    """Map a failed call to ShardUnavailable (outage), StalePlacement (NOT_FOUND) or ShardCallError (refusal)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code in UNAVAILABLE_CODES:
        return ShardUnavailable(shard, f"{code.name}: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return StalePlacement(shard, details)
    return ShardCallError(shard, code, details)


def _hold_open(channel: grpc.Channel):
    """Open a ``grpc.health.v1.Health/Watch`` stream on ``channel`` and leave it open.

    grpcio's synchronous API polls a channel's calls on a thread that lives only
    while some call is open on that channel. A router's calls to a shard are
    short and one MoE layer after another, so without a long-lived call every
    layer started (and stopped) a new polling thread per shard (measured on the
    bench model at batch 64: 85 -> 81 ms of replica CPU per step, and 0.81 ->
    0.66 ms of client CPU per call). The open stream keeps that one thread alive. Its
    messages (health changes, a few bytes each) are never read; closing the
    channel ends it. Returns the stream, or None if it could not be opened (calls
    then work as before, only dearer).
    """
    try:
        return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    except Exception:  # pragma: no cover - a closed channel; the next call reports the real problem
        return None


class GrpcTransport:
    """Sends each MoE layer's shard batches to the shards' ``ExpertService``.

    Args:
        addresses: shard -> ``"host:port"``, as a mapping (read again on
            :meth:`refresh`, so a dict updated in place works) or a callable
            (e.g. one that asks the shard's Ray actor for its address).
        wire_dtype: dtype on the wire (``None``: each hidden's own dtype). See the
            module docstring for the precision of ``torch.bfloat16``.
        timeout_s: deadline of each call.
        channel_credentials: ``grpc.ChannelCredentials`` for TLS (``None``: insecure).
        channel_options: extra gRPC channel options (e.g. the TLS target name override).
    """

    def __init__(self, addresses: Mapping[int, str] | Callable[[int], str], wire_dtype: torch.dtype | None = None,
                 timeout_s: float = 30.0, channel_credentials=None, *,
                 max_message_bytes: int = EXPERT_MAX_MESSAGE_BYTES,
                 channel_options: list[tuple[str, str]] | None = None):
        if wire_dtype is not None:
            dtype_name(wire_dtype)  # ValueError for a dtype the wire cannot carry
        self._addresses = addresses
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self._credentials = channel_credentials
        self._options = grpc_options(max_message_bytes) + list(channel_options or [])
        self._lock = threading.Lock()
        self._resolved: dict[int, str] = {}
        self._channels: dict[int, tuple[grpc.Channel, _Stubs, object]] = {}
        self._closed = False
        self._stats = WireStats()

    def wire_stats(self) -> WireStats:
        """Bytes sent so far (:class:`WireStats`)."""
        with self._lock:
            return self._stats

    def _count(self, hidden: list[torch.Tensor], batches: Sequence[ShardBatch], index_bytes: int) -> None:
        d_bytes = [h.shape[1] * (self.wire_dtype or h.dtype).itemsize for h in hidden]
        with self._lock:
            st = self._stats
            self._stats = dataclasses.replace(
                st, calls=st.calls + len(batches), layers=st.layers + 1,
                hidden_bytes=st.hidden_bytes + sum(h.shape[0] * d for h, d in zip(hidden, d_bytes)),
                index_bytes=st.index_bytes + index_bytes,
                per_assignment_bytes=st.per_assignment_bytes + sum(b.num_rows * d for b, d in zip(batches, d_bytes)))

    # -- channels ----------------------------------------------------------------
    def address(self, shard: int) -> str:
        """The address used for ``shard`` (resolved on first use and after :meth:`refresh`)."""
        with self._lock:
            addr = self._resolved.get(shard)
        if addr is not None:
            return addr
        try:
            addr = self._addresses(shard) if callable(self._addresses) else self._addresses[shard]
        except KeyError:
            raise ShardUnavailable(shard, "no address known for this shard") from None
        except ShardUnavailable:
            raise
        except Exception as e:
            raise ShardUnavailable(shard, f"could not resolve its address: {e!r}") from e
        with self._lock:
            return self._resolved.setdefault(shard, str(addr))

    def _stub(self, shard: int) -> "_Stubs":
        with self._lock:
            if self._closed:
                raise RuntimeError("GrpcTransport is closed")
            entry = self._channels.get(shard)
        if entry is not None:
            return entry[1]
        addr = self.address(shard)
        if self._credentials is not None:
            channel = grpc.secure_channel(addr, self._credentials, options=self._options)
        else:
            channel = grpc.insecure_channel(addr, options=self._options)
        with self._lock:
            entry = self._channels.get(shard)
            if entry is None and not self._closed:
                entry = self._channels[shard] = (channel, _Stubs(channel), _hold_open(channel))
                channel = None
        if channel is not None:  # lost a race (or closed meanwhile): keep the existing one
            channel.close()
            if entry is None:
                raise RuntimeError("GrpcTransport is closed")
        return entry[1]

    def refresh(self, shard: int, address: str | None = None) -> None:
        """Forget ``shard``'s channel and address (a restarted actor listens on a new port).

        The next call re-resolves the address (or uses ``address`` when given).
        Calls still in flight on the old channel are cancelled.
        """
        with self._lock:
            entry = self._channels.pop(shard, None)
            self._resolved.pop(shard, None)
            if address is not None:
                self._resolved[shard] = address
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            entries = list(self._channels.values())
            self._channels.clear()
        for channel, _, _ in entries:
            channel.close()

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- data path ---------------------------------------------------------------
    def submit(self, moe_layer: int, batches: Sequence[ShardBatch], epoch: int) -> "Future[list[torch.Tensor]]":
        """Send every batch concurrently; the future resolves to one ``[N_i, D]`` output per batch, in order."""
        result: Future[list[torch.Tensor]] = Future()
        n = len(batches)
        if n == 0:
            result.set_result([])
            return result
        sends = _on_host(batches, self.wire_dtype)
        self._count([h for h, _ in sends], batches, sum(4 * r.numel() for _, r in sends if r is not None))
        # the answers land in one host buffer (pinned when the layer lives on an accelerator), batch after batch
        ref = batches[0].hidden
        sizes = [b.num_rows for b in batches]
        flat = torch.empty((sum(sizes), ref.shape[1]), dtype=ref.dtype,
                           pin_memory=ref.device.type == "cuda")
        offsets = [0]
        for n_i in sizes:
            offsets.append(offsets[-1] + n_i)
        left = [n]
        lock = threading.Lock()
        calls: list[grpc.Future] = []

        def fail(exc: BaseException) -> None:
            with lock:
                if not result.done():
                    try:
                        result.set_exception(exc)
                    except InvalidStateError:  # the caller cancelled it meanwhile
                        pass

        def on_done(i: int, b: ShardBatch, call: grpc.Future) -> None:
            if result.done():
                return
            try:
                resp = call.result()
                out = resp.message.output
                y = tensor_from_bytes(out.dtype, out.shape, resp.payload)
                want = (b.num_rows, b.hidden.shape[1])
                if tuple(y.shape) != want:
                    raise ShardCallError(b.shard, grpc.StatusCode.INTERNAL,
                                         f"answered shape {list(y.shape)} for {want[0]} (token, expert) rows "
                                         f"of width {want[1]}")
                with torch.inference_mode():  # flat is an inference tensor when the engine made it
                    flat[offsets[i]:offsets[i + 1]].copy_(y)  # the one host copy (and the cast back, if any)
            except grpc.RpcError as e:
                fail(shard_error(b.shard, e))
                return
            except grpc.FutureCancelledError:
                fail(ShardUnavailable(b.shard, "call cancelled"))
                return
            except BaseException as e:  # decoding errors etc. must still resolve the future
                fail(e)
                return
            with lock:
                if result.done():
                    return
                left[0] -= 1
                if left[0] == 0:
                    try:
                        result.set_result(LayerOutputs(flat, sizes))
                    except InvalidStateError:
                        pass

        for i, b in enumerate(batches):
            try:
                stub = self._stub(b.shard)
                req = ComputeCall(pb.ComputeRequest(moe_layer=moe_layer, epoch=epoch, slot_ids=b.slot_ids,
                                                    counts=b.counts, experts=b.experts,
                                                    wire_version=EXPERT_WIRE_VERSION), *sends[i])
                call = stub.Compute.future(req, timeout=self.timeout_s)
            except ShardUnavailable as e:
                fail(e)
                break
            except ValueError as e:
                if "closed channel" in str(e):
                    fail(ShardUnavailable(b.shard, f"channel closed ({e})"))
                else:
                    fail(e)
                break
            except Exception as e:
                fail(e)
                break
            calls.append(call)
            call.add_done_callback(lambda c, i=i, b=b: on_done(i, b, c))
        def cancel_rest(f: Future) -> None:  # first failure (or the caller cancelled): drop the other calls
            if f.cancelled() or f.exception() is not None:
                for c in calls:
                    c.cancel()

        result.add_done_callback(cancel_rest)
        return result

    # -- control path ------------------------------------------------------------
    def _unary(self, shard: int, method: str, request, timeout: float | None):
        stub = self._stub(shard)
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout_s)
        except grpc.RpcError as e:
            raise shard_error(shard, e) from None

    def status(self, shard: int, timeout: float | None = None) -> dict:
        """The shard's Status reply as a dict (see ``ExpertServer.status``)."""
        return status_to_dict(self._unary(shard, "Status", pb.StatusRequest(), timeout))

    def load_slots(self, shard: int, assignments: Iterable[tuple[int, int, int]],
                   timeout: float | None = None, stage: bool = False) -> int:
        """Load ``(moe_layer, slot, expert)`` triples on ``shard``; returns bytes loaded.

        ``stage=True`` adds each copy next to what its slot holds (live migration).
        """
        req = pb.LoadSlotsRequest(slots=[pb.SlotAssignment(moe_layer=l, slot=s, expert=e)
                                         for l, s, e in assignments], stage=stage)
        return self._unary(shard, "LoadSlots", req, timeout).bytes_loaded

    def unload_slots(self, shard: int, refs: Iterable[tuple[int, int] | tuple[int, int, int | None]],
                     timeout: float | None = None) -> int:
        """Unload ``(moe_layer, slot)`` (whole slot) or ``(moe_layer, slot, expert)`` (that copy only) on
        ``shard``; returns how many refs released a copy."""
        req = pb.UnloadSlotsRequest(slots=[
            pb.SlotRef(moe_layer=r[0], slot=r[1]) if len(r) < 3 or r[2] is None
            else pb.SlotRef(moe_layer=r[0], slot=r[1], expert=r[2]) for r in refs])
        return self._unary(shard, "UnloadSlots", req, timeout).slots_unloaded


class _Stubs(pb_grpc.ExpertServiceStub):
    """The service's stub, with ``Compute`` encoding and decoding its tensors in place
    (:class:`~moeyard.expert_actors.wire.ComputeCall` in, a decoded response out)."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(channel)
        self.Compute = channel.unary_unary(f"/{pb.DESCRIPTOR.package}.ExpertService/Compute",
                                           request_serializer=encode_compute_request,
                                           response_deserializer=decode_compute_response)


def _on_host(batches: Sequence[ShardBatch], wire_dtype: torch.dtype | None
             ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each batch's ``(hidden [U_i, D], token_rows [N_i] int32 | None)`` in host memory, hidden cast to
    the wire dtype. Batches already in host memory are used where they are; on an accelerator the whole
    layer comes over in one non-blocking copy into a pinned buffer (torch's caching host allocator reuses
    those from layer to layer), one wait for it, however many shards."""
    dev = batches[0].hidden.device
    if dev.type == "cpu":
        return [((b.hidden if wire_dtype is None else b.hidden.to(wire_dtype)),
                 None if b.token_rows is None else b.token_rows.to(torch.int32)) for b in batches]
    return stage_to_host(batches, wire_dtype, pin=dev.type == "cuda")


def stage_to_host(batches: Sequence[ShardBatch], wire_dtype: torch.dtype | None, pin: bool
                  ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`_on_host` for batches on a device: their token rows (int32) and hidden states packed into one
    byte buffer on the device (rows first: every part then starts aligned to its element size), one copy
    of it to the host (``pin``: into pinned memory, non-blocking, then one wait), and views of it."""
    dtype = wire_dtype or batches[0].hidden.dtype
    rows = [None if b.token_rows is None else b.token_rows.to(torch.int32).reshape(-1) for b in batches]
    hid = [b.hidden.to(dtype).reshape(-1) for b in batches]
    parts = [r.view(torch.uint8) for r in rows if r is not None] + [h.view(torch.uint8) for h in hid]
    packed = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=batches[0].hidden.device)
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=pin)
    host.copy_(packed, non_blocking=pin)
    if pin:
        torch.cuda.current_stream(packed.device).synchronize()
    out_rows: list[torch.Tensor | None] = []
    start = 0
    for r in rows:
        if r is None:
            out_rows.append(None)
            continue
        out_rows.append(host[start:start + 4 * r.numel()].view(torch.int32))
        start += 4 * r.numel()
    out: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for b, h, r in zip(batches, hid, out_rows):
        nbytes = h.numel() * dtype.itemsize
        out.append((host[start:start + nbytes].view(dtype).view(b.hidden.shape), r))
        start += nbytes
    return out
