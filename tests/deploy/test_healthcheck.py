"""asap.tools.healthcheck: the image's HEALTHCHECK and compose's healthchecks."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asap.tools.healthcheck import main, target_from_command


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (
            [
                "/opt/asap/bin/python",
                "/opt/asap/bin/asap",
                "serve",
                "expert",
                "--host",
                "0.0.0.0",
                "--port",
                "7",
            ],
            "127.0.0.1:7",
        ),
        (["asap", "serve", "attention", "--experts", "e:1"], "127.0.0.1:50061"),
        (["asap", "serve", "scheduler", "--host=10.1.2.3", "--port=9"], "10.1.2.3:9"),
        (["asap", "serve", "scheduler", "--host", "::1"], "[::1]:50051"),
        (["asap", "up"], None),
        (["python", "-m", "http.server"], None),
    ],
)
def test_target_from_command(argv: list[str], target: str | None) -> None:
    assert target_from_command(argv) == target


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


def test_exit_code_follows_serving_status(
    health_server: tuple[int, health.HealthServicer], capsys: pytest.CaptureFixture[str]
) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([f"127.0.0.1:{port}"]) == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main([f"127.0.0.1:{port}"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"127.0.0.1:{port}: NOT_SERVING",
        f"127.0.0.1:{port}: SERVING",
    ]


def test_unreachable_target_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["127.0.0.1:1", "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out
