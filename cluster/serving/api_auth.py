"""The API's authentication: a bearer token on every call but health checks and reflection."""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2

from moeyard.rpc import REQUEST_ID_KEY

log = logging.getLogger("moeyard.cluster.serving.api_server")

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

# Services reachable without a token: probes and `grpcurl list/describe`.
_OPEN_METHOD_PREFIXES = (
    f"/{HEALTH_SERVICE_NAME}/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, rid: str):
    async def deny(context):
        await context.abort(code, message, trailing_metadata=((REQUEST_ID_KEY, rid),))

    async def unary(request, context):
        await deny(context)

    async def streaming(request, context):
        await deny(context)
        yield  # pragma: no cover  (makes this an async generator)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every method but health and reflection."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the API token must not be empty")
        self._expected = token.encode()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        values = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        problem = None
        if not values:
            problem = "missing API token: send metadata 'authorization: Bearer <token>'"
        else:
            value = values[0] if isinstance(values[0], str) else values[0].decode("utf-8", "replace")
            scheme, _, given = value.partition(" ")
            if scheme.lower() != "bearer" or not given.strip():
                problem = "malformed authorization metadata: expected 'Bearer <token>'"
            elif not hmac.compare_digest(given.strip().encode(), self._expected):
                problem = "invalid API token"
        if problem is None:
            return handler
        rid = uuid.uuid4().hex
        log.warning("request %s to %s refused: %s", rid, method, problem)
        return _denying_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem, rid)
