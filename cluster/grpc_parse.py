"""Parsing gRPC messages without letting a bad one turn into UNKNOWN/INTERNAL.

grpcio answers UNKNOWN (or INTERNAL) when a request deserializer raises. The
servers here deserialize with :func:`tolerant_deserializer`, which hands the
method a :class:`MalformedMessage` instead, so the method can answer
INVALID_ARGUMENT with a message that names the problem.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError


class MalformedMessage:
    """Stands in for a message whose bytes do not parse; ``.message`` says why."""

    def __init__(self, message: str):
        self.message = message


def tolerant_deserializer(message_cls, what: str = "request"):
    """``message_cls.FromString`` that returns a :class:`MalformedMessage` instead of raising."""
    name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return MalformedMessage(f"the {what} is not a valid {name} message: {e}")
    return deserialize
