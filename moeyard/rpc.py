"""gRPC helpers that every server and client of ours shares (the API, the expert shards, the output sink).

Parsing messages without letting a bad one turn into UNKNOWN/INTERNAL: grpcio
answers UNKNOWN (or INTERNAL) when a request deserializer raises. The servers
here deserialize with :func:`tolerant_deserializer`, which hands the method a
:class:`MalformedMessage` instead, so the method can answer INVALID_ARGUMENT
with a message that names the problem.

Addresses: :func:`host_port` writes ``HOST:PORT`` (brackets for IPv6), and
:func:`advertised_host` turns a wildcard bind into an address other machines can dial.
"""

from __future__ import annotations

import socket

from google.protobuf.message import DecodeError

WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")

# -- the public API (moeyard.v1.Inference): moeyard.client and the API server ---------------
INFERENCE_SERVICE = "moeyard.v1.Inference"
REQUEST_ID_KEY = "x-request-id"
"""Metadata key of a request's id, in both directions (the server answers it in the trailers)."""
API_MAX_MESSAGE_BYTES = 64 << 20

# -- the expert protocol (moeyard.v1.ExpertService): the router's transport and the shards ---
EXPERT_SERVICE = "moeyard.v1.ExpertService"
EXPERT_WIRE_VERSION = 2
"""``ComputeRequest.wire_version``: 2 sends each token once per shard (``hidden`` the distinct tokens,
``token_rows`` naming one per (token, expert) row); a shard refuses any other version by name."""
EXPERT_MAX_MESSAGE_BYTES = 256 << 20
"""Send/receive limit on both ends: the largest batch (e.g. 2048 tokens x top-8 x 7168 x fp32 = 470 MB
would not fit; 2048 x 2 x 7168 x 4 = 117 MB does). Raise it with ``max_message_bytes`` if needed."""


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options both ends of a protocol set alike (message size limits)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def local_ip() -> str:
    """This machine's address as its hostname resolves (loopback when it does not)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def advertised_host(host: str, advertise_host: str | None = None) -> str:
    """Where callers reach a server bound on ``host``: ``advertise_host`` if given, else ``host``,
    except that a wildcard bind advertises :func:`local_ip`."""
    adv = advertise_host or host
    return local_ip() if adv in WILDCARD_HOSTS else adv


class MalformedMessage:
    """Stands in for a message whose bytes do not parse; ``.message`` says why."""

    def __init__(self, message: str):
        self.message = message


def tolerant_deserializer(message_cls, what: str = "request", parse=None):
    """``message_cls.FromString`` (or ``parse``, a parser of the same bytes) that returns a
    :class:`MalformedMessage` instead of raising."""
    name = message_cls.DESCRIPTOR.full_name
    parse = parse or message_cls.FromString

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            return MalformedMessage(f"the {what} is not a valid {name} message: {e}")
    return deserialize
