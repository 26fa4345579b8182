"""The container health check against a mutual-TLS service: it presents the service's own certificate,
found in the service's command line or in ASAP_TLS_DIR."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asap.rpc.tls import TlsConfig
from asap.tools.healthcheck import main, tls_from_command


def test_tls_from_command_reads_the_flags_else_the_environment(tmp_path: Path) -> None:
    argv = ["/opt/asap/bin/asap", "serve", "expert", "--tls-cert", "/c", "--tls-key=/k", "--tls-ca", "/a"]
    assert tls_from_command(argv, {}) == TlsConfig(ca="/a", cert="/c", key="/k")
    plain = ["asap", "serve", "attention", "--experts", "e:1"]
    assert tls_from_command(plain, {}) is None
    (tmp_path / "attention").mkdir()
    (tmp_path / "attention" / "tls.crt").write_text("")
    from_env = tls_from_command(plain, {"ASAP_TLS_DIR": str(tmp_path)})
    assert from_env == TlsConfig.from_dir(tmp_path, "attention")


@pytest.fixture
def tls_health_port(tls_dir: Path) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", TlsConfig.from_dir(tls_dir, "expert").server_credentials())
    server.start()
    yield port
    server.stop(None)


def test_the_check_presents_a_certificate(
    tls_health_port: int, tls_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{tls_health_port}"
    assert main([target, "--timeout", "2"]) == 1  # plaintext is refused
    assert main([target, "--tls", str(tls_dir / "expert")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{target}: UNAVAILABLE") and lines[1] == f"{target}: SERVING"
