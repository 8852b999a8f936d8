"""Python client of the moeyard inference API (``moeyard.v1.Inference``).

    from moeyard.client import MoeyardClient

    with MoeyardClient("127.0.0.1:50051") as c:          # token: MOEYARD_API_TOKEN or ~/.moeyard/token
        for chunk in c.generate("Hello", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
        r = c.generate_all([1, 2, 3], max_new_tokens=8)  # token-id prompt
        print(r.token_ids, r.finish_reason, r.usage, r.request_id)

:class:`AsyncMoeyardClient` is the same on ``grpc.aio``. Failed calls raise
:class:`MoeyardError` (``.code`` is the :class:`grpc.StatusCode`, ``.message`` the
server's explanation, ``.request_id`` the id from the ``x-request-id`` trailer).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moeyard.rpc import API_MAX_MESSAGE_BYTES, INFERENCE_SERVICE, REQUEST_ID_KEY, grpc_options
from moeyard.v1 import inference_pb2 as pb
from moeyard.v1 import inference_pb2_grpc as pb_grpc

TOKEN_ENV = "MOEYARD_API_TOKEN"
TOKEN_FILE = Path("~/.moeyard/token")
_CHANNEL_OPTIONS = grpc_options(API_MAX_MESSAGE_BYTES)


def resolve_token(token: str | None = None) -> str | None:
    """The API token: ``token`` if given, else ``$MOEYARD_API_TOKEN``, else ``~/.moeyard/token``, else None."""
    if token:
        return token
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env:
        return env
    path = TOKEN_FILE.expanduser()
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return text or None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerateChunk:
    """One streamed response: the tokens (and text) added by one engine step."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    """None until the last chunk, then "stop" or "length"."""
    usage: Usage | None = None
    """Set on the last chunk only."""


@dataclass
class GenerateResult:
    request_id: str | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None

    def to_dict(self) -> dict:
        return {"request_id": self.request_id, "token_ids": list(self.token_ids), "text": self.text,
                "finish_reason": self.finish_reason,
                "usage": None if self.usage is None else {"prompt_tokens": self.usage.prompt_tokens,
                                                          "completion_tokens": self.usage.completion_tokens}}

    def add(self, chunk: GenerateChunk) -> None:
        self.request_id = chunk.request_id or self.request_id
        self.token_ids.extend(chunk.token_ids)
        self.text += chunk.text
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage


class MoeyardError(Exception):
    """A failed API call: ``code`` (grpc.StatusCode), ``message``, ``request_id`` (may be None)."""

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def _request_id_of(metadata) -> str | None:
    for k, v in metadata or ():
        if k == REQUEST_ID_KEY:
            return v if isinstance(v, str) else v.decode()
    return None


def _error(e: grpc.RpcError) -> MoeyardError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    try:
        rid = _request_id_of(e.trailing_metadata())
    except Exception:  # not every RpcError has trailers
        rid = None
    return MoeyardError(code or grpc.StatusCode.UNKNOWN, details or "", rid)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class Chat:
    """A conversation as a prompt: the server renders it with the model's chat template."""

    messages: tuple[Message, ...]

    @classmethod
    def user(cls, content: str) -> "Chat":
        return cls((Message("user", content),))


def build_request(prompt: str | Sequence[int] | Chat, *, max_new_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
                  ignore_eos: bool = False, request_id: str | None = None) -> pb.GenerateRequest:
    """A ``GenerateRequest``: ``prompt`` is text (a ``str``), token ids (a sequence of ints) or a :class:`Chat`."""
    if isinstance(prompt, Chat):
        req = pb.GenerateRequest(messages=pb.ChatMessages(
            messages=[pb.ChatMessage(role=m.role, content=m.content) for m in prompt.messages]))
    elif isinstance(prompt, str):
        req = pb.GenerateRequest(text=prompt)
    else:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[int(t) for t in prompt]))
    if max_new_tokens is not None:
        req.max_new_tokens = max_new_tokens
    if temperature is not None:
        req.temperature = temperature
    if top_p is not None:
        req.top_p = top_p
    if top_k is not None:
        req.top_k = top_k
    if seed is not None:
        req.seed = seed
    req.stop.extend(stop)
    req.stop_token_ids.extend(int(t) for t in stop_token_ids)
    req.ignore_eos = ignore_eos
    if request_id:
        req.request_id = request_id
    return req


def _chunk(resp: pb.GenerateResponse) -> GenerateChunk:
    usage = (Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens) if resp.HasField("usage") else None)
    return GenerateChunk(resp.request_id, list(resp.token_ids), resp.text, resp.finish_reason or None, usage)


def _info(resp: pb.ModelInfoResponse) -> dict:
    return {f.name: getattr(resp, f.name) for f in resp.DESCRIPTOR.fields}


def _health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class _Base:
    def __init__(self, addr: str, token: str | None, timeout: float | None, tls_root_certs: bytes | None):
        self.addr = addr
        self._token = resolve_token(token)
        self.timeout = timeout
        self.tls_root_certs = tls_root_certs

    def __repr__(self) -> str:  # never shows the token
        return f"{type(self).__name__}({self.addr!r}, token={'set' if self._token else None})"

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class MoeyardClient(_Base):
    """Synchronous client. ``tls_root_certs`` (PEM bytes) switches to TLS."""

    def __init__(self, addr: str, token: str | None = None, timeout: float | None = None,
                 tls_root_certs: bytes | None = None):
        super().__init__(addr, token, timeout, tls_root_certs)
        if tls_root_certs is not None:
            self._channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(tls_root_certs),
                                                options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.insecure_channel(addr, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MoeyardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **kwargs) -> Iterator[GenerateChunk]:
        """Stream chunks; stopping the iteration early cancels the request on the server.

        Keyword arguments: those of :func:`build_request`."""
        call = self._stub.Generate(build_request(prompt, **kwargs), metadata=self._metadata(),
                                   timeout=self._timeout(timeout))
        try:
            for resp in call:
                yield _chunk(resp)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()  # no-op once the call has completed

    def generate_all(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                     **kwargs) -> GenerateResult:
        result = GenerateResult()
        for chunk in self.generate(prompt, timeout=timeout, **kwargs):
            result.add(chunk)
        return result

    def model_info(self, timeout: float | None = None) -> dict:
        try:
            return _info(self._stub.ModelInfo(pb.ModelInfoRequest(), metadata=self._metadata(),
                                              timeout=self._timeout(timeout)))
        except grpc.RpcError as e:
            raise _error(e) from None

    def health(self, service: str = INFERENCE_SERVICE, timeout: float | None = None) -> str:
        """The server's health status name ("SERVING", "NOT_SERVING", ...); needs no token."""
        try:
            resp = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self._timeout(timeout))
        except grpc.RpcError as e:
            raise _error(e) from None
        return _health_name(resp.status)


class AsyncMoeyardClient(_Base):
    """The client on ``grpc.aio`` (create it inside the event loop that uses it)."""

    def __init__(self, addr: str, token: str | None = None, timeout: float | None = None,
                 tls_root_certs: bytes | None = None):
        super().__init__(addr, token, timeout, tls_root_certs)
        if tls_root_certs is not None:
            self._channel = grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(tls_root_certs),
                                                    options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(addr, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMoeyardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **kwargs) -> AsyncIterator[GenerateChunk]:
        """Stream chunks; closing the iterator early cancels the request on the server."""
        call = self._stub.Generate(build_request(prompt, **kwargs), metadata=self._metadata(),
                                   timeout=self._timeout(timeout))
        try:
            async for resp in call:
                yield _chunk(resp)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def generate_all(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                           **kwargs) -> GenerateResult:
        result = GenerateResult()
        stream = self.generate(prompt, timeout=timeout, **kwargs)
        try:
            async for chunk in stream:
                result.add(chunk)
        finally:
            await stream.aclose()
        return result

    async def model_info(self, timeout: float | None = None) -> dict:
        try:
            return _info(await self._stub.ModelInfo(pb.ModelInfoRequest(), metadata=self._metadata(),
                                                    timeout=self._timeout(timeout)))
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    async def health(self, service: str = INFERENCE_SERVICE, timeout: float | None = None) -> str:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None
        return _health_name(resp.status)
