"""API-key checks: `Authorization: Bearer <key>`, compared in constant time.

HTTP guards the /v1 routes (plain /health stays open for probes); gRPC guards every method,
the standard health service included, so a gRPC probe sends the key as metadata.
"""
from __future__ import annotations

import hashlib
import hmac

import grpc

UNAUTHORIZED_MESSAGE = "Missing or invalid API key: send the header 'Authorization: Bearer <key>'."


def key_matches(api_key: str, authorization: str | None) -> bool:
    presented = authorization or ""
    scheme, _, token = presented.partition(" ")
    if scheme.lower() != "bearer":
        token = ""
    # Comparing digests keeps the time independent of where, and whether in length, they differ.
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(),
                               hashlib.sha256(api_key.encode()).digest())


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self.api_key = api_key

    async def intercept_service(self, continuation, details):
        metadata = dict(details.invocation_metadata or ())
        if key_matches(self.api_key, metadata.get("authorization")):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED_MESSAGE)
        yield  # pragma: no cover - makes this an async generator

    kind = (handler.request_streaming, handler.response_streaming)
    des, ser = handler.request_deserializer, handler.response_serializer
    if kind == (False, False):
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if kind == (False, True):
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    if kind == (True, False):
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, des, ser)
