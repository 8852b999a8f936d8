"""The public inference API: an asyncio gRPC server for ``moeyard.v1.Inference``.

The server turns ``Generate`` calls into requests of a :class:`GenerateBackend`
(an :class:`moeyard.attention.async_engine.AsyncEngine` in-process, or a cluster's
router) and streams one response per engine step. Text is handled here, not by
the backend: text prompts are encoded with the server's tokenizer, responses
carry text deltas (:class:`moeyard.attention.tokenizer.IncrementalDetokenizer`), and
stop strings end the stream with the text cut before the stop.

Production habits:

* every request has an id (the client's or a generated one) that appears in the
  logs, in every response and in the ``x-request-id`` trailing metadata;
* a bearer token (``authorization: Bearer <token>``) is required by default,
  checked by a server interceptor with :func:`hmac.compare_digest`; the health
  and reflection services stay open so probes and ``grpcurl list`` work; the
  token is never logged or echoed;
* errors map to status codes with messages that name the problem:
  ``RequestError`` -> INVALID_ARGUMENT (so is a request that is not a valid
  protobuf message: grpcio would answer UNKNOWN), ``QueueFull`` -> RESOURCE_EXHAUSTED,
  ``EngineFailed`` -> UNAVAILABLE, anything unexpected -> INTERNAL (the server
  keeps serving); a cancelled call or an expired deadline closes the backend's
  stream, which aborts the engine request and frees its KV blocks;
* hostile input is refused cheaply before it reaches the engine: with the
  model's vocabulary size and context length (read once from the backend's
  ``model_info`` at start) a prompt over the context is refused without
  copying or scanning its ids, a text prompt that cannot fit the context is
  refused without tokenizing it, and ``stop_token_ids`` must be real token ids
  (at most :data:`MAX_STOP_TOKEN_IDS`). Sampling values the sampler cannot
  represent are mapped to what they mean: a temperature in
  ``(0, MIN_TEMPERATURE)`` is greedy (the limit of sampling as the temperature
  goes to 0; dividing fp32 logits by it gives inf/NaN, which failed the whole
  engine step), and ``top_p`` is raised to :data:`MIN_TOP_P` (a nucleus of
  the top token either way; a ``top_p`` that rounds to 0 in fp32 kept no token).
  Unknown fields are ignored (protobuf's forward compatibility).

``grpc.health.v1.Health`` (SERVING for ``""`` and ``moeyard.v1.Inference``) and
server reflection are registered too, so ``grpcurl -plaintext HOST:PORT list``
works against a server started without TLS.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moeyard.attention.async_engine import EngineFailed, QueueFull
from moeyard.attention.sequence import RequestError, RequestOutput, SamplingParams
from moeyard.attention.tokenizer import IncrementalDetokenizer, TextTokenizer
from moeyard.cluster.serving.api_auth import HEALTH_SERVICE_NAME, BearerAuthInterceptor
from moeyard.cluster.serving.api_chat import ChatRefused, chat_prompt
from moeyard.rpc import (
    API_MAX_MESSAGE_BYTES,
    INFERENCE_SERVICE,
    REQUEST_ID_KEY,
    MalformedMessage,
    host_port,
    tolerant_deserializer,
)
from moeyard.v1 import inference_pb2 as pb
from moeyard.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 16
DEFAULT_MAX_NEW_TOKENS_LIMIT = 4096
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_REQUEST_ID_CHARS = 128
MIN_TEMPERATURE = 1e-5
"""A temperature in (0, MIN_TEMPERATURE) samples greedily (what sampling tends to as it goes to 0)."""
MIN_TOP_P = 1e-9
"""Smaller top_p values are raised to this (both keep only the top token; fp32 rounds tiny ones to 0)."""
MODEL_LIMITS_TIMEOUT_S = 10.0

class GenerateBackend(Protocol):
    """What the API server serves: a streaming generator plus model facts."""

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, as :meth:`AsyncEngine.generate` streams them.

        Raises ``RequestError``/``QueueFull`` before the first output and
        ``EngineFailed`` mid-stream; closing the iterator aborts the request."""
        ...

    async def model_info(self) -> dict:
        """Fields of ``ModelInfoResponse`` (unknown keys are ignored)."""
        ...


# -- request handling -----------------------------------------------------------------

class _InvalidRequest(Exception):
    """The request is malformed; the message names the field."""


@dataclass(frozen=True)
class _ModelLimits:
    """What the pre-checks know of the model (``None``: unknown, the engine checks alone)."""

    vocab_size: int | None = None
    max_model_len: int | None = None
    max_text_chars: int | None = None
    """Longer text prompts cannot fit the context: no token covers more characters than the
    longest string in the vocabulary."""


def _max_token_chars(tokenizer: TextTokenizer | None) -> int | None:
    get_vocab = getattr(getattr(tokenizer, "tok", None), "get_vocab", None)
    if get_vocab is None:
        return None
    try:
        return max(map(len, get_vocab()), default=None)
    except Exception:  # an exotic tokenizer: no text pre-check
        log.debug("cannot read the tokenizer's vocabulary", exc_info=True)
        return None


class _TextStream:
    """Text deltas of a growing output, cut at the first stop string.

    Text that could be the start of a stop string is held back until the next
    tokens decide it, so no text ever has to be taken back."""

    def __init__(self, tok: TextTokenizer, stops: Sequence[str]):
        self.detok = IncrementalDetokenizer(tok)
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""   # everything decoded so far
        self.sent = 0    # chars of self.text already sent

    def push(self, new_ids: list[int], final: bool) -> tuple[str, bool]:
        """(delta to send, whether a stop string was reached)."""
        before = len(self.text)
        self.text += self.detok.push(new_ids, final=final)
        if self.stops:
            start = max(0, before - self.longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                cut = max(min(hits), self.sent)
                delta, self.sent = self.text[self.sent:cut], cut
                return delta, True
        end = len(self.text)
        if not final and self.stops:
            end -= self._pending_stop_prefix()
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent:end], end
        return delta, False

    def _pending_stop_prefix(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        text = self.text
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


async def _abort(context: grpc.aio.ServicerContext, rid: str, code: grpc.StatusCode, message: str):
    """End the call with ``code``; the trailers keep the request id."""
    await context.abort(code, message, trailing_metadata=((REQUEST_ID_KEY, rid),))


def _valid_request_id(rid: str) -> bool:
    return 0 < len(rid) <= MAX_REQUEST_ID_CHARS and all(33 <= ord(c) <= 126 for c in rid)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise _InvalidRequest(f"{name} must be a finite number, got {value}")
    return value


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, backend: GenerateBackend, tokenizer: TextTokenizer | None, *,
                 max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT):
        if max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be >= 1, got {max_new_tokens_limit}")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_new_tokens_limit = max_new_tokens_limit
        self.limits = _ModelLimits()
        self._in_flight: set[str] = set()

    async def load_limits(self, timeout: float = MODEL_LIMITS_TIMEOUT_S) -> _ModelLimits:
        """Read the model's vocabulary size and context length from the backend (once, at start).

        On failure the pre-checks stay off (the engine still refuses what it cannot serve)."""
        try:
            info = await asyncio.wait_for(self.backend.model_info(), timeout)
        except Exception as e:
            log.warning("model_info failed (%s: %s): requests are not pre-checked against the model's "
                        "limits", type(e).__name__, e)
            return self.limits
        vocab = int(info.get("vocab_size") or 0) or None
        max_len = int(info.get("max_model_len") or 0) or None
        per_token = _max_token_chars(self.tokenizer)
        self.limits = _ModelLimits(vocab, max_len, max_len * per_token if max_len and per_token else None)
        return self.limits

    # -- request -> engine inputs -----------------------------------------------------
    def _params(self, req: pb.GenerateRequest) -> SamplingParams:
        max_new = req.max_new_tokens if req.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        if max_new < 1:
            raise _InvalidRequest(f"max_new_tokens must be >= 1, got {max_new}")
        if max_new > self.max_new_tokens_limit:
            raise _InvalidRequest(f"max_new_tokens must be <= {self.max_new_tokens_limit} "
                                  f"(this server's limit), got {max_new}")
        temperature = _finite("temperature", req.temperature) if req.HasField("temperature") else 0.0
        if temperature < 0:
            raise _InvalidRequest(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0
        top_p = _finite("top_p", req.top_p) if req.HasField("top_p") else 1.0
        if not 0 < top_p <= 1:
            raise _InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
        top_p = max(top_p, MIN_TOP_P)
        if req.top_k < 0:
            raise _InvalidRequest(f"top_k must be >= 0 (0 disables it), got {req.top_k}")
        stops = tuple(req.stop)
        if stops:
            if self.tokenizer is None:
                raise _InvalidRequest("stop strings need a tokenizer and this model has none: "
                                      "use stop_token_ids")
            if len(stops) > MAX_STOP_STRINGS:
                raise _InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
            if any(not s for s in stops):
                raise _InvalidRequest("stop strings must not be empty")
            if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
                raise _InvalidRequest(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise _InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(req.stop_token_ids)}")
        vocab = self.limits.vocab_size
        bad = [t for t in req.stop_token_ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise _InvalidRequest(f"stop_token_ids: token id {bad[0]} out of range "
                                  f"[0, {vocab if vocab is not None else 'vocab size'})")
        params = SamplingParams(max_tokens=max_new, temperature=temperature, top_p=top_p, top_k=req.top_k,
                                seed=req.seed if req.HasField("seed") else None,
                                stop_token_ids=tuple(req.stop_token_ids), stop=stops,
                                ignore_eos=req.ignore_eos)
        params.validate()
        return params

    def _prompt(self, req: pb.GenerateRequest) -> list[int]:
        which = req.WhichOneof("prompt")
        if which is None:
            raise _InvalidRequest("prompt is missing: set text, token_ids or messages")
        max_len = self.limits.max_model_len
        if which == "messages":
            ids = self.tokenizer_or_fail().encode(self._chat_text(req.messages), add_bos=False)
        elif which == "text":
            if self.tokenizer is None:
                raise _InvalidRequest("this model has no tokenizer: send token_ids")
            if not req.text:
                raise _InvalidRequest("prompt is empty: text is an empty string")
            max_chars = self.limits.max_text_chars
            if max_chars is not None and len(req.text) > max_chars:  # would tokenize for seconds to be refused
                raise _InvalidRequest(f"text prompt has {len(req.text)} characters; it cannot fit the maximum "
                                      f"context of {max_len} tokens")
            ids = self.tokenizer.encode(req.text)
        else:
            n = len(req.token_ids.ids)
            if max_len is not None and n >= max_len:  # the engine's check, without copying a huge list
                raise _InvalidRequest(f"prompt has {n} tokens; the maximum context is {max_len} tokens "
                                      "(prompt plus at least one new token)")
            ids = list(req.token_ids.ids)
        if not ids:
            raise _InvalidRequest("prompt is empty: token_ids has no ids")
        return ids

    def tokenizer_or_fail(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise _InvalidRequest("this model has no tokenizer: send token_ids")
        return self.tokenizer

    def _chat_text(self, chat: pb.ChatMessages) -> str:
        try:
            return chat_prompt(self.tokenizer_or_fail(), chat, self.limits.max_text_chars, self.limits.max_model_len)
        except ChatRefused as e:
            raise _InvalidRequest(str(e)) from None

    # -- RPCs ---------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if isinstance(request, MalformedMessage):
            await _abort(context, uuid.uuid4().hex, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        rid = request.request_id or uuid.uuid4().hex
        if not _valid_request_id(rid):
            await _abort(context, uuid.uuid4().hex, grpc.StatusCode.INVALID_ARGUMENT,
                         f"request_id must be 1-{MAX_REQUEST_ID_CHARS} printable ASCII characters "
                         "without spaces")
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        if rid in self._in_flight:
            await _abort(context, rid, grpc.StatusCode.ALREADY_EXISTS, f"request id {rid!r} is already in flight")
        t0 = time.perf_counter()
        peer = context.peer()
        n_prompt = n_out = 0
        finish = None
        outcome = "ok"
        self._in_flight.add(rid)
        try:
            try:
                params = self._params(request)
                prompt = self._prompt(request)
            except (_InvalidRequest, RequestError) as e:
                outcome = "invalid"
                await _abort(context, rid, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            n_prompt = len(prompt)
            text = _TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
            stream = self.backend.generate(rid, prompt, params)
            try:
                async for out in stream:
                    n_out += len(out.new_token_ids)
                    delta, stopped = (text.push(out.new_token_ids, final=out.finished)
                                      if text is not None else ("", False))
                    if stopped or out.finished:
                        finish = "stop" if stopped else (out.finish_reason or "stop")
                        yield pb.GenerateResponse(
                            request_id=rid, token_ids=out.new_token_ids, text=delta, finish_reason=finish,
                            usage=pb.Usage(prompt_tokens=out.num_prompt_tokens or n_prompt,
                                           completion_tokens=n_out))
                        return
                    yield pb.GenerateResponse(request_id=rid, token_ids=out.new_token_ids, text=delta)
            finally:
                # closes the engine request when we stop early, fail, or are cancelled
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            outcome = "error"
            log.error("request %s: backend ended the stream without a finished output", rid)
            await _abort(context, rid, grpc.StatusCode.INTERNAL,
                         f"the backend ended the stream without finishing (request {rid})")
        except RequestError as e:
            outcome = "invalid"
            await _abort(context, rid, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            outcome = "queue-full"
            await _abort(context, rid, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineFailed as e:
            outcome = "engine-failed"
            await _abort(context, rid, grpc.StatusCode.UNAVAILABLE, f"the engine failed this request: {e}")
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except grpc.aio.AbortError:  # context.abort() above: already mapped
            raise
        except Exception as e:
            outcome = "internal"
            log.exception("request %s failed", rid)
            await _abort(context, rid, grpc.StatusCode.INTERNAL,
                         f"internal error ({type(e).__name__}); see the server log for request {rid}")
        finally:
            self._in_flight.discard(rid)
            if finish is not None:
                outcome = f"finished:{finish}"
            log.info("request %s %s prompt_tokens=%d completion_tokens=%d %.3fs peer=%s",
                     rid, outcome, n_prompt, n_out, time.perf_counter() - t0, peer)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext):
        rid = uuid.uuid4().hex
        if isinstance(request, MalformedMessage):
            await _abort(context, rid, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        try:
            info = dict(await self.backend.model_info())
            info.setdefault("has_tokenizer", self.tokenizer is not None)
            info["max_new_tokens_limit"] = min(self.max_new_tokens_limit, 2**32 - 1)
            fields = pb.ModelInfoResponse.DESCRIPTOR.fields_by_name
            unknown = sorted(k for k in info if k not in fields)
            if unknown:
                log.debug("model_info: ignoring unknown fields %s", unknown)
            return pb.ModelInfoResponse(**{k: v for k, v in info.items() if k in fields and v is not None})
        except Exception as e:
            log.exception("request %s: model_info failed", rid)
            await _abort(context, rid, grpc.StatusCode.INTERNAL,
                         f"internal error ({type(e).__name__}); see the server log for request {rid}")


def add_inference_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """``add_InferenceServicer_to_server`` with deserializers that never raise: a request that is
    not a valid protobuf message (corrupt bytes, a string that is not UTF-8) is INVALID_ARGUMENT."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=tolerant_deserializer(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo, request_deserializer=tolerant_deserializer(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(INFERENCE_SERVICE, handlers)


# -- server ---------------------------------------------------------------------------

class ApiServer:
    """The gRPC server; :meth:`start` binds and returns ``HOST:PORT``."""

    def __init__(self, backend: GenerateBackend, tokenizer: TextTokenizer | None, *,
                 host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None,
                 require_auth: bool = True, server_credentials: grpc.ServerCredentials | None = None,
                 max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
                 max_message_bytes: int = API_MAX_MESSAGE_BYTES,
                 max_concurrent_rpcs: int | None = None):
        if auth_token is None and require_auth:
            raise ValueError("auth_token is required; pass require_auth=False to serve without auth")
        if auth_token is not None and not auth_token:
            raise ValueError("auth_token must not be empty")
        self.backend = backend
        self.tokenizer = tokenizer
        self.host = host
        self.port = port
        self.auth_token = auth_token
        self.server_credentials = server_credentials
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.servicer = InferenceServicer(backend, tokenizer, max_new_tokens_limit=max_new_tokens_limit)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address: str | None = None

    def __repr__(self) -> str:  # never shows the token
        return f"ApiServer(address={self.address!r}, auth={self.auth_token is not None})"

    async def start(self) -> str:
        if self.server is not None:
            raise RuntimeError("the API server is already started")
        interceptors = [BearerAuthInterceptor(self.auth_token)] if self.auth_token is not None else []
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(interceptors=interceptors, options=options,
                                 maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        await self.servicer.load_limits()
        add_inference_servicer(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((INFERENCE_SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
        bind = host_port(self.host, self.port)
        if self.server_credentials is not None:
            port = server.add_secure_port(bind, self.server_credentials)
        else:
            port = server.add_insecure_port(bind)
        if not port:
            raise OSError(f"cannot bind the API server to {bind}")
        await server.start()
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        self.port = port
        self.address = host_port(self.host, port)
        log.info("inference API listening on %s (%s, auth %s)", self.address,
                 "TLS" if self.server_credentials is not None else "plaintext",
                 "on" if self.auth_token is not None else "OFF")
        return self.address

    async def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish for ``grace`` seconds, then cancel them."""
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.server = None

    async def wait_for_termination(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def serve_api(backend: GenerateBackend, tokenizer: TextTokenizer | None, *,
                    host: str = "127.0.0.1", port: int = 0, auth_token: str | None = None,
                    require_auth: bool = True, server_credentials: grpc.ServerCredentials | None = None,
                    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT,
                    max_message_bytes: int = API_MAX_MESSAGE_BYTES,
                    max_concurrent_rpcs: int | None = None) -> ApiServer:
    """Start the API server on the running event loop; ``server.address`` is ``HOST:PORT``."""
    server = ApiServer(backend, tokenizer, host=host, port=port, auth_token=auth_token,
                       require_auth=require_auth, server_credentials=server_credentials,
                       max_new_tokens_limit=max_new_tokens_limit, max_message_bytes=max_message_bytes,
                       max_concurrent_rpcs=max_concurrent_rpcs)
    await server.start()
    return server
