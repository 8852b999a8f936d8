"""The gRPC server of one expert shard (``moeyard.v1.ExpertService``).

An :class:`ExpertServer` holds the expert weights of one shard
(:class:`~moeyard.expert_actors.slots.ExpertSlots`), reads only its own experts from
the checkpoint, and answers:

- ``Compute``: the grouped SwiGLU for one MoE layer's tokens, grouped by slot;
- ``LoadSlots`` / ``UnloadSlots``: change the slots it holds (a placement move;
  with ``stage`` a new expert copy joins a slot next to the old one for a live
  migration, and an ``UnloadSlots`` naming the old expert releases it);
- ``Status``: every ``(slot, expert)`` copy held, weight bytes, RSS, counters;
- ``grpc.health.v1.Health``: SERVING once its slots are loaded.

Every error becomes a status code with a message that names the problem
(``NOT_FOUND`` for a slot that does not hold the expert the router named — its
placement epoch is stale — or a slot the shard does not hold,
``INVALID_ARGUMENT`` for a malformed request, among them one that does not name
the expert it expects in every slot, ``FAILED_PRECONDITION`` for a checkpoint
that lacks a tensor or a third copy staged into one slot, ``INTERNAL`` for
anything else); no request can kill the server.

Threading: requests are decoded and encoded on gRPC's worker threads in
parallel. Grouped FFNs hold one compute lock (compute calls on one shard would
only compete for the same cores). Slot changes never take it: checkpoint
reads happen first, then, under an admin lock that serialises loads and
unloads, the layer's new stacked weights are built aside and swapped in with
one reference assignment (:class:`~moeyard.expert_actors.slots.ExpertSlots`). A compute
runs on the table snapshot it looked up, so it neither waits for a load nor
sees half of one.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moeyard.expert_actors.slots import ExpertSlots, SlotFull, SlotNotHeld
from moeyard.expert_actors.wire import (
    ComputeResult,
    decode_compute_request,
    dtype_name,
    encode_compute_response,
    request_token_rows,
    rows_from_bytes,
    tensor_from_bytes,
)
from moeyard.model.checkpoint import CheckpointError, CheckpointReader
from moeyard.model.cpu_matmul import MatmulMode
from moeyard.model.devices import resolve_device
from moeyard.model.dtypes import resolve_dtype
from moeyard.model.spec import ModelSpec, load_spec
from moeyard.model.weight_names import expert_names
from moeyard.rpc import (
    EXPERT_MAX_MESSAGE_BYTES,
    EXPERT_SERVICE,
    EXPERT_WIRE_VERSION,
    MalformedMessage,
    advertised_host,
    grpc_options,
    host_port,
    tolerant_deserializer,
)
from moeyard.v1 import expert_pb2 as pb
from moeyard.v1 import expert_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

def rss_bytes() -> int:
    """Resident set size of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RequestError(Exception):
    """A request the server refuses; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _Prefetched:
    """A reader over tensors already read from the checkpoint (for ExpertSlots.load under the lock)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def get(self, name, expected_shape=None, dtype=None):
        t = self._tensors[name]
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


class ExpertServer:
    """One expert shard's weights behind a gRPC server.

    Args:
        shard_id: this shard's index (slot ``p`` lives on shard ``p // slots_per_shard``).
        spec: the model spec (``None``: read ``model_dir/config.json``).
        model_dir: checkpoint directory; only this shard's experts are read.
        dtype: compute dtype of the weights (``torch.float32``/``torch.bfloat16`` or a name).
        assignments: MoE layer -> ``[(slot, logical expert)]`` to load before serving.
        host, port: where to listen (``port=0`` picks a free port; see :attr:`address`).
        num_threads: ``torch.set_num_threads`` for this process (``None``: leave as is).
        server_credentials: ``grpc.ServerCredentials`` for TLS (``None``: insecure, e.g. loopback).
        advertise_host: host to put in :attr:`address` (default: ``host``; for a
            wildcard host, this machine's IP).
        device: where the weights live and the FFNs run (``auto``: CUDA where this process has a
            GPU); requests and answers cross the wire through host memory.
        reader: where the expert tensors come from (default: a ``CheckpointReader`` of ``model_dir``;
            benchmarks pass one that makes full-size random weights on the device).
        matmul: the CPU's matmul kernel for the experts (``ExpertSlots``).
        deterministic: batch-invariant expert math (``ExpertSlots``).
    """

    def __init__(self, shard_id: int, spec: ModelSpec | None, model_dir: str | Path, dtype: torch.dtype | str,
                 assignments: Mapping[int, Iterable[tuple[int, int]]] | None = None, host: str = "127.0.0.1",
                 port: int = 0, num_threads: int | None = None, server_credentials=None, *,
                 max_workers: int = 8, max_message_bytes: int = EXPERT_MAX_MESSAGE_BYTES,
                 advertise_host: str | None = None, device: str | torch.device = "auto",
                 reader: CheckpointReader | None = None, matmul: MatmulMode = "auto", deterministic: bool = False):
        self.shard_id = int(shard_id)
        self.model_dir = Path(model_dir)
        self.spec = spec if spec is not None else load_spec(model_dir)
        if self.spec.moe is None:
            raise ValueError(f"{self.model_dir} has no MoE layers; an expert shard has nothing to hold")
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.reader = reader if reader is not None else CheckpointReader(self.model_dir)
        self.slots = ExpertSlots(self.spec, self.dtype, self.device, matmul=matmul, deterministic=deterministic)
        self._compute_lock = threading.Lock()  # serialises grouped FFNs; slot changes do not take it
        self._stats_lock = threading.Lock()
        self.requests = 0
        self.tokens = 0
        self.compute_seconds = 0.0
        self.last_epoch = -1
        self._admin_pool: ThreadPoolExecutor | None = None

        t0 = time.perf_counter()
        pairs = [(int(layer), int(s), int(e)) for layer, lst in (assignments or {}).items() for s, e in lst]
        try:
            self.load(pairs)
        except RequestError as e:
            raise ValueError(f"expert shard {shard_id}: {e.message}") from None
        log.info("shard %d: loaded %d slots (%.1f MiB) in %.2fs", self.shard_id, len(pairs),
                 self.slots.nbytes() / 2**20, time.perf_counter() - t0)

        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers,
                                                      thread_name_prefix=f"expert-shard-{shard_id}"),
                                   options=grpc_options(max_message_bytes))
        _add_servicer(_Servicer(self), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        bind = host_port(host, port)
        if server_credentials is not None:
            self.port = self._server.add_secure_port(bind, server_credentials)
        else:
            self.port = self._server.add_insecure_port(bind)
        if not self.port:
            raise RuntimeError(f"expert shard {shard_id} could not bind {bind}")
        self.host = host
        self.address = host_port(advertised_host(host, advertise_host), self.port)
        self._server.start()
        self._stopped = False
        for service in ("", EXPERT_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("shard %d serving on %s", self.shard_id, self.address)

    # -- Python API (what the servicer calls; usable in-process too) ----------------
    def _check_layer(self, moe_layer: int) -> None:
        n = self.spec.num_moe_layers
        if not 0 <= moe_layer < n:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"moe_layer {moe_layer} out of range [0, {n})")

    def load(self, assignments: Iterable[tuple[int, int, int]], stage: bool = False) -> int:
        """Load ``(moe_layer, slot, logical expert)`` triples; returns bytes loaded.

        ``stage=False``: each slot holds only the given expert afterwards.
        ``stage=True``: the copy is added next to what the slot holds (live
        migration; at most two experts per slot, FAILED_PRECONDITION beyond).
        Validates everything and reads every tensor before touching the slots, so
        a bad request changes nothing; computes go on meanwhile.
        """
        spec, moe = self.spec, self.spec.moe
        assignments = list(assignments)
        d, inter = spec.hidden_size, moe.intermediate_size
        tensors: dict[str, torch.Tensor] = {}
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for moe_layer, slot, expert in assignments:
            self._check_layer(moe_layer)
            if slot < 0:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"slot id {slot} is negative")
            if not 0 <= expert < moe.num_experts:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"logical expert {expert} out of range [0, {moe.num_experts})")
            names = expert_names(spec.family, spec.moe_layers[moe_layer], expert)
            for name, shape in ((names.gate, (inter, d)), (names.up, (inter, d)), (names.down, (d, inter))):
                if name not in tensors:
                    try:
                        tensors[name] = self.reader.get(name, shape, self.dtype)
                    except CheckpointError as e:
                        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            by_layer.setdefault(moe_layer, []).append((slot, expert))
        try:
            return self.slots.load_layers(_Prefetched(tensors), by_layer, stage)
        except SlotFull as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None

    def unload(self, refs: Iterable[tuple[int, int] | tuple[int, int, int | None]]) -> int:
        """Unload ``(moe_layer, slot)`` (the whole slot) or ``(moe_layer, slot, expert)`` (only that
        expert's copy; ``None``: the whole slot); returns how many refs released a copy (others are ignored)."""
        by_layer: dict[int, list[tuple[int, int | None]]] = {}
        num_experts = self.spec.moe.num_experts
        for ref in refs:
            moe_layer, slot = int(ref[0]), int(ref[1])
            expert = None if len(ref) < 3 or ref[2] is None else int(ref[2])
            self._check_layer(moe_layer)
            if expert is not None and not 0 <= expert < num_experts:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"logical expert {expert} out of range [0, {num_experts})")
            by_layer.setdefault(moe_layer, []).append((slot, expert))
        return self.slots.unload_layers(by_layer)

    def compute(self, moe_layer: int, slot_ids: list[int], counts: list[int], x: torch.Tensor,
                epoch: int, experts: list[int], token_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Validate and run one grouped FFN; returns (``[N, D]`` in ``x``'s dtype, compute seconds).

        ``x [U, D]`` holds each token once and ``token_rows [N]`` (already range-checked) names the row of
        ``x`` of each (token, expert) row in slot order; without it ``x`` is those ``N`` rows.

        ``experts[i]`` is the logical expert the router expects in ``slot_ids[i]`` (its placement's
        ``phy2log``); a slot that holds another one answers NOT_FOUND (the router's epoch is stale).
        """
        self._check_layer(moe_layer)
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if len(slot_ids) != len(counts):
            raise RequestError(bad, f"slot_ids has {len(slot_ids)} entries but counts has {len(counts)}")
        experts = list(experts)
        if len(experts) != len(slot_ids):
            raise RequestError(bad, f"experts has {len(experts)} entries but slot_ids has {len(slot_ids)} "
                                    "(name the logical expert expected in each slot)")
        num_experts = self.spec.moe.num_experts
        wrong = [e for e in experts if not 0 <= e < num_experts]
        if wrong:
            raise RequestError(bad, f"logical expert {wrong[0]} out of range [0, {num_experts})")
        if any(c < 0 for c in counts):
            raise RequestError(bad, f"counts must be non-negative, got {counts}")
        negative = [s for s in slot_ids if s < 0]
        if negative:  # malformed, not a stale placement (NOT_FOUND would send the router refreshing it)
            raise RequestError(bad, f"slot id {negative[0]} is negative")
        d = self.spec.hidden_size
        if x.dim() != 2 or x.shape[1] != d:
            raise RequestError(bad, f"hidden must have shape [N, {d}], got {list(x.shape)}")
        n_rows = x.shape[0] if token_rows is None else token_rows.shape[0]
        if sum(counts) != n_rows:
            what = "hidden has" if token_rows is None else "token_rows names"
            raise RequestError(bad, f"counts sum to {sum(counts)} but {what} {n_rows} rows")
        with self._compute_lock:
            table = self.slots.table(moe_layer)  # one snapshot for the lookup and the FFN
            try:
                table.rows(slot_ids, experts)
            except SlotNotHeld as e:
                raise RequestError(grpc.StatusCode.NOT_FOUND, self._not_held_message(e, epoch)) from None
            t0 = time.perf_counter()
            if token_rows is not None:
                x = x.to(self.slots.device).index_select(0, token_rows.to(self.slots.device))
            if x.shape[0] == 0:
                out = torch.empty(0, d, dtype=x.dtype, device=self.slots.device)
            else:
                out = self.slots.compute(moe_layer, list(slot_ids), list(counts), x, experts, table=table)
            dt = time.perf_counter() - t0
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        with self._stats_lock:
            self.requests += 1
            self.tokens += int(x.shape[0])
            self.compute_seconds += dt
            self.last_epoch = max(self.last_epoch, int(epoch))
        return out, dt

    def _not_held_message(self, e: SlotNotHeld, epoch: int) -> str:
        if not e.held:
            return (f"slot {e.slot} of MoE layer {e.moe_layer} is not loaded on shard {self.shard_id}, not expert "
                    f"{e.expert} (router placement epoch {epoch} is stale, or shard {self.shard_id} lost its slots "
                    "(restart))")
        return (f"slot {e.slot} of MoE layer {e.moe_layer} holds expert(s) {e.held}, not {e.expert} "
                f"(router placement epoch {epoch} is stale)")

    def admin(self, fn):
        """Run a load/unload on the shard's background thread, which runs at a lower CPU priority
        (nice +10 on Linux): re-stacking weights during a live migration then yields the cores to
        ``Compute`` instead of stretching the steps of every router waiting on this shard."""
        if self._admin_pool is None:
            self._admin_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"shard-{self.shard_id}-admin",
                                                  initializer=_lower_priority)
        return self._admin_pool.submit(fn).result()

    def held_slots(self) -> dict[int, list[tuple[int, int]]]:
        """MoE layer -> every ``(slot, logical expert)`` copy held now, sorted.

        A slot appears twice while a staged migration holds two copies in it.
        """
        return {layer: self.slots.pairs(layer) for layer in range(self.spec.num_moe_layers)}

    def status(self) -> dict:
        """The Status reply as a plain dict (for Ray actors, logs, tests).

        ``slots``: MoE layer -> every ``(slot, expert)`` copy held (see :meth:`held_slots`);
        ``weight_bytes`` counts the same snapshot.
        """
        tables = [self.slots.table(layer) for layer in range(self.spec.num_moe_layers)]
        held = {t.moe_layer: list(t.keys) for t in tables}
        with self._stats_lock:
            counters = dict(requests=self.requests, tokens=self.tokens,
                            compute_seconds=self.compute_seconds, last_epoch=self.last_epoch)
        return dict(shard_id=self.shard_id, address=self.address, pid=os.getpid(), dtype=dtype_name(self.dtype),
                    slots=held, weight_bytes=sum(t.nbytes() for t in tables), rss_bytes=rss_bytes(),
                    num_threads=torch.get_num_threads(), **counters)

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (health NOT_SERVING first); in-flight calls get ``grace`` seconds."""
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> "ExpertServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(0)


def _lower_priority() -> None:
    try:  # per thread on Linux: nice applies to the calling thread's id
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class _Servicer(pb_grpc.ExpertServiceServicer):
    """Maps requests to :class:`ExpertServer` calls and errors to status codes."""

    def __init__(self, server: ExpertServer):
        self.s = server

    def _run(self, context, method: str, fn):
        try:
            return fn()
        except RequestError as e:
            code, msg = e.code, e.message
        except ValueError as e:  # a malformed tensor, or ExpertSlots refusing an argument
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except KeyError as e:
            code, msg = grpc.StatusCode.NOT_FOUND, str(e.args[0]) if e.args else repr(e)
        except Exception as e:  # never let a request take the server down
            log.exception("shard %d: %s failed", self.s.shard_id, method)
            code, msg = grpc.StatusCode.INTERNAL, f"{method} failed on shard {self.s.shard_id}: {e!r}"
        if code != grpc.StatusCode.INTERNAL:
            log.debug("shard %d: %s refused (%s): %s", self.s.shard_id, method, code.name, msg)
        context.abort(code, msg)

    def Compute(self, call, context):
        """``call``: the request decoded by :func:`decode_compute_request` (hidden states and token rows
        are views of the received bytes); answers a :class:`ComputeResult` (encoded with one copy)."""
        def run():
            request = call.message
            if request.wire_version != EXPERT_WIRE_VERSION:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"ComputeRequest of wire format version {request.wire_version}: this shard "
                                   f"speaks version {EXPERT_WIRE_VERSION} (upgrade routers and shards together)")
            if not request.HasField("hidden"):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "hidden is missing")
            x = tensor_from_bytes(request.hidden.dtype, request.hidden.shape, call.payload)
            counts = list(request.counts)
            rows = None
            token_rows = request_token_rows(call)
            if len(token_rows):
                try:
                    rows = rows_from_bytes(token_rows, sum(counts), x.shape[0] if x.dim() else 0)
                except ValueError as e:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            out, dt = self.s.compute(request.moe_layer, list(request.slot_ids), counts, x,
                                     request.epoch, list(request.experts), token_rows=rows)
            return ComputeResult(pb.ComputeResponse(compute_seconds=dt, shard_id=self.s.shard_id), out)
        return self._run(context, "Compute", run)

    def LoadSlots(self, request, context):
        def run():
            t0 = time.perf_counter()
            assignments = [(a.moe_layer, a.slot, a.expert) for a in request.slots]
            n = self.s.admin(lambda: self.s.load(assignments, stage=request.stage))
            return pb.LoadSlotsResponse(bytes_loaded=n, load_seconds=time.perf_counter() - t0,
                                        weight_bytes=self.s.slots.nbytes())
        return self._run(context, "LoadSlots", run)

    def UnloadSlots(self, request, context):
        def run():
            refs = [(r.moe_layer, r.slot, r.expert if r.HasField("expert") else None) for r in request.slots]
            n = self.s.admin(lambda: self.s.unload(refs))
            return pb.UnloadSlotsResponse(slots_unloaded=n, weight_bytes=self.s.slots.nbytes())
        return self._run(context, "UnloadSlots", run)

    def Status(self, request, context):
        def run():
            st = self.s.status()
            resp = pb.StatusResponse(shard_id=st["shard_id"], weight_bytes=st["weight_bytes"],
                                     rss_bytes=st["rss_bytes"], dtype=st["dtype"], pid=st["pid"],
                                     address=st["address"], num_threads=st["num_threads"],
                                     requests=st["requests"], tokens=st["tokens"],
                                     compute_seconds=st["compute_seconds"], last_epoch=st["last_epoch"])
            for layer, pairs in st["slots"].items():
                resp.layers.add(moe_layer=layer, slot_ids=[s for s, _ in pairs], experts=[e for _, e in pairs])
            return resp
        return self._run(context, "Status", run)


def _refusing_malformed(method):
    def call(request, context):
        if isinstance(request, MalformedMessage):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return method(request, context)
    return call


def _add_servicer(servicer: _Servicer, server: grpc.Server) -> None:
    """``add_ExpertServiceServicer_to_server``, except that a request that does not parse is
    INVALID_ARGUMENT (grpcio answers INTERNAL "Exception deserializing request!"), and that ``Compute``'s
    tensors are read and written in place (``expert_actors/frames.py``)."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["ExpertService"].methods:
        if m.name == "Compute":
            deserialize = tolerant_deserializer(pb.ComputeRequest, parse=decode_compute_request)
            serialize = encode_compute_response
        else:
            deserialize = tolerant_deserializer(getattr(pb, m.input_type.name))
            serialize = getattr(pb, m.output_type.name).SerializeToString
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            _refusing_malformed(getattr(servicer, m.name)), request_deserializer=deserialize,
            response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(EXPERT_SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(EXPERT_SERVICE, handlers)
