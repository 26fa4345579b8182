"""Asking a server's standard grpc health service whether it is SERVING: the one client-side check,
blocking (container health checks, waiting for a local cluster) and asyncio (the scheduler's view of its
ranks). Imports only grpc, so the container health check stays light."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _answer(reply: health_pb2.HealthCheckResponse) -> tuple[bool, str]:
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def _failed(exc: grpc.RpcError) -> tuple[bool, str]:
    return False, f"{exc.code().name}: {exc.details()}"


def check_health(channel: grpc.Channel, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, status name or error text) of ``service`` ('' = the whole server) behind ``channel``."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        return _failed(exc)
    return _answer(reply)


async def check_health_async(
    channel: grpc.aio.Channel, service: str = "", timeout_s: float = 2.0
) -> tuple[bool, str]:
    """As ``check_health``, on an asyncio channel."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        return _failed(exc)
    return _answer(reply)
