"""asap.rpc.health: the blocking and the asyncio health check agree with the server's status."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asap.rpc.health import check_health, check_health_async


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def _both(target: str, service: str = "") -> tuple[tuple[bool, str], tuple[bool, str]]:
    async def aio() -> tuple[bool, str]:
        async with grpc.aio.insecure_channel(target) as channel:
            return await check_health_async(channel, service, timeout_s=2.0)

    with grpc.insecure_channel(target) as channel:
        blocking = check_health(channel, service, timeout_s=2.0)
    return blocking, asyncio.run(aio())


def test_status_follows_the_server(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _both(target) == ((False, "NOT_SERVING"), (False, "NOT_SERVING"))
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _both(target) == ((True, "SERVING"), (True, "SERVING"))


def test_an_unknown_service_is_not_serving(health_server: tuple[str, health.HealthServicer]) -> None:
    target, _ = health_server
    for serving, text in _both(target, "no.such.Service"):
        assert not serving
        assert text.startswith("NOT_FOUND")
