"""Token deltas from the attention replicas to the API ingress, one message per engine step.

Without this, every new token of every request crosses from a replica to the
ingress as its own Ray streaming-generator item: at batch 64 that is 64 items
per step, about 0.5 ms of ingress CPU and 0.2 ms of replica CPU each, so one
ingress process tops out near 2,000 tokens/s per core (docs/benchmarks.md).
Here each replica keeps one gRPC stream open to each ingress it serves
(:class:`SinkPusher`) and sends, per engine step, one :class:`OutputBatch` with
the deltas of every request of that ingress; the ingress (:class:`OutputSink`)
hands each delta to the request's queue.

Each request's Ray Serve call stays what it was for everything but the
per-step tokens: admission and its errors, cancellation (the ingress cancels
the call), the replica's death (the call fails), and the final item, which
repeats every output token id. So the stream is only a faster path: a delta it
loses (a broken stream, a restarting ingress) is filled in from the final
item, and a replica that cannot reach a sink sends that request's deltas on
the Serve call as before (``offset``-tagged either way, so the ingress drops
repeats).

Security: the sink listens on the internal bind address (``shard_host``) with
the internal mutual TLS when configured, and every stream must carry the
ingress's random secret (``x-moeyard-sink-secret``), which the ingress hands to
replicas only inside Ray calls. Deltas name their request by a random key the
ingress made for it, never by the client's request id (which a client picks).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from moeyard.cluster.infra.net import node_ip
from moeyard.rpc import WILDCARD_HOSTS, MalformedMessage, advertised_host, host_port, tolerant_deserializer
from moeyard.v1 import outputs_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "moeyard.v1.OutputSink"
METHOD = f"/{SERVICE}/Deliver"
SECRET_HEADER = "x-moeyard-sink-secret"
_parse = tolerant_deserializer(pb.OutputBatch, "message")
MAX_BACKLOG = 256
"""Messages a replica queues for one sink before it declares the stream stuck."""


@dataclass(frozen=True)
class SinkSpec:
    """Where a replica sends a request's deltas: the ingress sink's address and secret."""

    address: str
    secret: str = field(repr=False)

    def target(self, key: str) -> "SinkTarget":
        """What a request's Ray call carries: this sink, and the request's key on it."""
        return SinkTarget(self, key)


@dataclass(frozen=True)
class SinkTarget:
    """Where one request's deltas go: a sink and the request's random key on it."""

    sink: SinkSpec
    key: str


@dataclass(frozen=True)
class Delta:
    """Output tokens ``offset``, ``offset + 1``, ... of one request."""

    offset: int
    token_ids: list[int]


class OutputSink:
    """The ingress end: a gRPC server (on the caller's event loop) that routes deltas to request queues.

    Args:
        host: bind address (loopback by default; a wildcard advertises this node's IP).
        server_credentials: the internal mutual-TLS credentials (``None``: plaintext).
    """

    def __init__(self, host: str = "127.0.0.1", server_credentials=None, advertise_host: str | None = None):
        self.host = host
        self.secret = secrets.token_urlsafe(32)
        self._credentials = server_credentials
        self._advertise = advertise_host
        self._queues: dict[str, asyncio.Queue] = {}
        self._server: grpc.aio.Server | None = None
        self.address: str | None = None
        self.batches = 0
        self.deltas = 0
        self.late = 0
        self.dropped = 0
        self._closed: OrderedDict[str, None] = OrderedDict()   # recently closed keys (bounded)

    async def start(self) -> str:
        handler = grpc.stream_unary_rpc_method_handler(self._deliver, request_deserializer=_parse,
                                                       response_serializer=pb.DeliverReply.SerializeToString)
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Deliver": handler}),))
        bind = host_port(self.host, 0)
        port = (self._server.add_secure_port(bind, self._credentials) if self._credentials is not None
                else self._server.add_insecure_port(bind))
        if not port:
            raise RuntimeError(f"output sink could not bind {bind}")
        await self._server.start()
        self.address = host_port(node_ip() if self.host in WILDCARD_HOSTS and not self._advertise
                                 else advertised_host(self.host, self._advertise), port)
        return self.address

    def spec(self) -> SinkSpec:
        if self.address is None:
            raise RuntimeError("output sink not started")
        return SinkSpec(self.address, self.secret)

    def open(self) -> tuple[str, asyncio.Queue]:
        """Start taking deltas for one request: returns a fresh random key (for the replica to send
        them under; never the client's request id, which a client chooses) and the queue they
        arrive on as :class:`Delta`."""
        key = secrets.token_hex(12)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[key] = q
        return key, q

    CLOSED_KEYS_KEPT = 4096
    """How many recently closed keys are remembered, to tell a late delta from a stray one."""

    def close(self, key: str) -> None:
        if self._queues.pop(key, None) is not None:
            self._closed[key] = None
            while len(self._closed) > self.CLOSED_KEYS_KEPT:
                self._closed.popitem(last=False)

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def _deliver(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.DeliverReply:
        given = dict(context.invocation_metadata() or ()).get(SECRET_HEADER, "")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.secret.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong {SECRET_HEADER} metadata")
        n = 0
        async for batch in request_iterator:
            if isinstance(batch, MalformedMessage):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, batch.message)
            n += 1
            self.batches += 1
            for d in batch.deltas:
                q = self._queues.get(d.key)
                if q is None and d.key in self._closed:
                    # the request's last item (which lists every token) came on the Serve call first
                    self.late += 1
                    continue
                if q is None or d.offset < 0:
                    self.dropped += 1
                    continue
                self.deltas += 1
                q.put_nowait(Delta(int(d.offset), list(d.token_ids)))
        return pb.DeliverReply(batches=n)


class _Conn:
    """One replica -> ingress stream: deltas pushed during one event-loop turn go out as one message."""

    def __init__(self, spec: SinkSpec, credentials, options):
        self.spec = spec
        self._credentials, self._options = credentials, options
        self.pending: list[pb.TokenDelta] = []
        self.flush_scheduled = False
        self.broken_until = 0.0
        self._channel = self._call = None
        self._outbox: asyncio.Queue | None = None
        self._writer: asyncio.Task | None = None
        self._connected = False

    def _connect(self) -> None:
        opts = [("grpc.max_send_message_length", 64 << 20)] + list(self._options or [])
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(self.spec.address, self._credentials, options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(self.spec.address, options=opts)
        deliver = self._channel.stream_unary(METHOD, request_serializer=pb.OutputBatch.SerializeToString,
                                             response_deserializer=pb.DeliverReply.FromString)
        self._call = deliver(metadata=((SECRET_HEADER, self.spec.secret),))
        self._outbox = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(self._call, self._outbox))

    async def _write_loop(self, call, outbox: asyncio.Queue) -> None:
        try:
            while True:
                msg = await outbox.get()
                if msg is None:
                    await call.done_writing()
                    return
                await call.write(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the ingress went away or refused us: fall back to the Serve calls
            self._broken(e)

    def _broken(self, e: BaseException) -> None:
        self.broken_until = time.monotonic() + SinkPusher.RETRY_AFTER_S
        log.warning("output sink %s unreachable (%s); sending deltas on the Serve calls for %.0f s",
                    self.spec.address, _why(e), SinkPusher.RETRY_AFTER_S)
        self._drop_stream()

    def usable(self) -> bool:
        return time.monotonic() >= self.broken_until

    async def ready(self, timeout_s: float) -> bool:
        """Open the stream now and wait until its channel is connected (False: unreachable).

        Without this, the first deltas of a replica wait in the outbox while the channel connects
        (TCP, HTTP/2, TLS: milliseconds), and a short request's final item, which takes the Serve
        call, can reach the ingress before them: its tokens would then arrive only with the final item.
        """
        if not self.usable():
            return False
        if self._call is not None and self._connected:
            return True
        if self._call is None:
            try:
                self._connect()
            except Exception as e:  # e.g. an address grpc cannot parse: same as unreachable
                self._broken(e)
                return False
        channel = self._channel
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout_s)
        except Exception as e:  # includes the time-out
            if self._channel is channel:
                self._broken(e)
            return False
        self._connected = self._channel is channel
        return self.usable()

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.pending:
            return
        batch, self.pending = pb.OutputBatch(deltas=self.pending), []
        if not self.usable():
            return  # lost: the requests' final items carry every token
        if self._call is None:
            try:
                self._connect()
            except Exception as e:  # e.g. an address grpc cannot parse: same as unreachable
                self._broken(e)
                return
        elif self._outbox.qsize() >= MAX_BACKLOG:  # the ingress stopped reading: give up on this stream
            self.broken_until = time.monotonic() + SinkPusher.RETRY_AFTER_S
            log.warning("output sink %s is %d messages behind; sending deltas on the Serve calls for %.0f s",
                        self.spec.address, MAX_BACKLOG, SinkPusher.RETRY_AFTER_S)
            self._drop_stream()
            return
        self._outbox.put_nowait(batch)

    def _drop_stream(self) -> None:
        self._connected = False
        call, channel = self._call, self._channel
        self._call = self._channel = self._outbox = self._writer = None
        if call is not None:
            call.cancel()
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        writer, outbox, channel = self._writer, self._outbox, self._channel
        if outbox is not None:
            outbox.put_nowait(None)
        if writer is not None:
            try:
                await asyncio.wait_for(writer, 5)
            except (asyncio.TimeoutError, Exception):
                pass
        if channel is not None:
            await channel.close()
        self._connected = False
        self._call = self._channel = self._outbox = self._writer = None


def _why(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return repr(e)


class SinkPusher:
    """The replica end: one stream per ingress sink, one message per sink per event-loop turn.

    Must be used from one event loop (the replica's). ``push`` returns False while
    the sink is unreachable (after a failed stream, for ``RETRY_AFTER_S``): the
    caller then sends the delta on the request's Serve call instead.
    """

    RETRY_AFTER_S = 5.0

    def __init__(self, channel_credentials=None, channel_options: Sequence[tuple[str, str]] | None = None):
        self._credentials = channel_credentials
        self._options = list(channel_options or [])
        self._conns: dict[SinkSpec, _Conn] = {}

    def push(self, sink: SinkSpec, key: str, offset: int, token_ids: Sequence[int]) -> bool:
        """Queue output tokens ``offset...`` of the request ``key`` names for ``sink``'s next message."""
        conn = self._conns.get(sink)
        if conn is None:
            conn = self._conns[sink] = _Conn(sink, self._credentials, self._options)
        if not conn.usable():
            return False
        conn.pending.append(pb.TokenDelta(key=key, offset=offset, token_ids=token_ids))
        if not conn.flush_scheduled:
            conn.flush_scheduled = True
            asyncio.get_running_loop().call_soon(conn.flush)
        return True

    async def ready(self, sink: SinkSpec, timeout_s: float = 2.0) -> bool:
        """Connect to ``sink`` before the first push (see :meth:`_Conn.ready`); False while it is unreachable."""
        conn = self._conns.get(sink)
        if conn is None:
            conn = self._conns[sink] = _Conn(sink, self._credentials, self._options)
        return await conn.ready(timeout_s)

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.flush()
            await c.close()
