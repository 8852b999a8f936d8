"""What an attention replica's ``generate`` streams back to the ingress over a Serve handle.

Each item is a :class:`StepTokens` (new output tokens of one request, tagged with their offset)
or, once and last, a :class:`StreamError`; the ingress turns the error back into the engine's
exception (:meth:`StreamError.exception`), which the API maps to a gRPC status.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from moeyard.attention.async_engine import EngineFailed, QueueFull
from moeyard.attention.sequence import RequestError


@dataclass(frozen=True)
class StepTokens:
    """Output tokens ``offset``, ``offset + 1``, ... of one request, from one engine step."""

    token_ids: list[int]
    offset: int
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    output_token_ids: list[int] | None = None
    """On the last item of a request whose deltas went to the output sink: every output token, so that
    the ingress fills in whatever the sink did not deliver."""


class StreamErrorCode(str, Enum):
    INVALID_ARGUMENT = "invalid_argument"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"


_EXCEPTIONS: dict[StreamErrorCode, type[Exception]] = {
    StreamErrorCode.INVALID_ARGUMENT: RequestError,
    StreamErrorCode.RESOURCE_EXHAUSTED: QueueFull,
    StreamErrorCode.UNAVAILABLE: EngineFailed,
}


@dataclass(frozen=True)
class StreamError:
    """Why the replica stopped a request's stream; the stream's last item."""

    code: StreamErrorCode
    message: str

    @classmethod
    def of(cls, exc: Exception) -> "StreamError":
        """The error item for an exception the engine raised for one request."""
        if isinstance(exc, (RequestError, TypeError)):
            return cls(StreamErrorCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, QueueFull):
            return cls(StreamErrorCode.RESOURCE_EXHAUSTED, str(exc))
        return cls(StreamErrorCode.UNAVAILABLE, str(exc))

    def exception(self) -> Exception:
        """The engine exception this error stands for (raised again at the ingress)."""
        return _EXCEPTIONS[self.code](self.message)


StreamItem = StepTokens | StreamError
