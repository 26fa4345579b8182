"""Token authentication of a gRPC server: an interceptor in front of every servicer.

Each call's ``authorization`` metadata goes to ``TokenAuth.check`` (``asap.auth``) before any servicer
code runs; a call without an accepted ``Bearer`` token ends with UNAUTHENTICATED and one fixed message,
whatever was wrong (missing, malformed, unknown), so a refusal reveals nothing. Health and reflection stay
open: probes and ``grpcurl list`` need no token. The servicers never see any of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from asap.auth import AUTHORIZATION, TokenAuth

__all__ = ["OPEN_SERVICES", "REFUSED_MESSAGE", "TokenAuthInterceptor"]

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Method prefixes answered without a token."""
REFUSED_MESSAGE = "missing or invalid credentials"


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED_MESSAGE)


_QUIET_S = 0.05
_DRAIN_S = 1.0


async def _drain_requests(requests: AsyncIterator[Any]) -> None:
    """Read (and drop, undecoded beyond grpc's framing) what a refused client is sending, until it has
    been quiet for ``_QUIET_S`` (at most ``_DRAIN_S``). Without this a refusal that ends the call while
    the client is still writing makes the client's next write fail locally, and the client sees
    INTERNAL ("Internal error from Core") instead of UNAUTHENTICATED (a race seen in CI)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + _DRAIN_S
    iterator = aiter(requests)
    while (left := until - loop.time()) > 0:
        try:
            await asyncio.wait_for(anext(iterator), min(_QUIET_S, left))
        except (TimeoutError, StopAsyncIteration):
            return


async def _refuse_request_stream(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await _drain_requests(requests)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED_MESSAGE)


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED_MESSAGE)
    yield  # pragma: no cover - abort raises; this makes the function a response stream


async def _refuse_duplex(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    await _refuse_request_stream(requests, context)
    yield  # pragma: no cover - abort raises; this makes the function a response stream


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that refuses the call (the request is never decoded)."""
    if handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(_refuse_duplex)
        return grpc.unary_stream_rpc_method_handler(_refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_refuse_request_stream)
    return grpc.unary_unary_rpc_method_handler(_refuse)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Lets a call through only with an accepted bearer token (``auth``), except to ``OPEN_SERVICES``."""

    def __init__(self, auth: TokenAuth) -> None:
        self.auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata or ()  # type: ignore[attr-defined]
        header = next((value for key, value in metadata if key == AUTHORIZATION), None)
        return handler if self.auth.check(header) else _refusal(handler)
