"""Mutual TLS on a real server on port 0 (``create_server(tls=...)``): the right certificates are served;
plaintext, no client certificate and another CA's certificates are refused; the server keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from asap.client import AsapClient, TlsConfig, Unavailable
from asap.rpc.channels import aio_channel, blocking_channel
from asap.rpc.health import check_health, check_health_async
from tests.client.fake_scheduler import FakeScheduler, start_fake_scheduler


@pytest.fixture
async def tls_target(tls_dir: Path) -> AsyncIterator[str]:
    handle, target = await start_fake_scheduler(FakeScheduler(), tls=TlsConfig.from_dir(tls_dir, "scheduler"))
    try:
        yield target
    finally:
        await handle.server.stop(None)


async def _prefill_works(target: str, tls: TlsConfig) -> None:
    async with AsapClient(target, tls=tls, retries=0, timeout_s=10) as client:
        result = await client.prefill(tokens=[1, 2, 3])
    assert result.first_token_id == 6  # the fake's answer: sum(tokens) % vocabulary


async def test_the_right_certificates_are_served(tls_target: str, tls_dir: Path) -> None:
    await _prefill_works(tls_target, TlsConfig.from_dir(tls_dir))
    # A service's own certificate is a client certificate too (attention -> expert, health checks).
    async with aio_channel(tls_target, TlsConfig.from_dir(tls_dir, "attention")) as channel:
        assert await check_health_async(channel) == (True, "SERVING")

    def blocking_check() -> tuple[bool, str]:  # off the loop: the server runs on it
        with blocking_channel(tls_target, TlsConfig.from_dir(tls_dir, "expert")) as channel:
            return check_health(channel)

    assert await asyncio.to_thread(blocking_check) == (True, "SERVING")


async def test_plaintext_is_refused_and_the_server_keeps_serving(tls_target: str, tls_dir: Path) -> None:
    async with AsapClient(tls_target, retries=0, timeout_s=10) as client:
        with pytest.raises(Unavailable):
            await client.prefill(tokens=[1, 2, 3])
    async with grpc.aio.insecure_channel(tls_target) as channel:
        serving, status = await check_health_async(channel)
    assert not serving and status.startswith("UNAVAILABLE")
    await _prefill_works(tls_target, TlsConfig.from_dir(tls_dir))


async def test_a_client_without_a_certificate_is_refused(tls_target: str, tls_dir: Path) -> None:
    server_only = grpc.ssl_channel_credentials(root_certificates=(tls_dir / "ca.crt").read_bytes())
    async with grpc.aio.secure_channel(tls_target, server_only) as channel:
        serving, status = await check_health_async(channel)
    assert not serving and status.startswith("UNAVAILABLE")
    await _prefill_works(tls_target, TlsConfig.from_dir(tls_dir))


async def test_another_cas_certificates_are_refused_both_ways(
    tls_target: str, tls_dir: Path, other_tls_dir: Path
) -> None:
    # A client certificate the server's CA did not sign, the client trusting the right CA ...
    foreign_client = TlsConfig(
        ca=tls_dir / "ca.crt",
        cert=other_tls_dir / "client" / "tls.crt",
        key=other_tls_dir / "client" / "tls.key",
    )
    # ... and a client with a valid certificate that does not trust the server's CA.
    distrusting = TlsConfig(ca=other_tls_dir / "ca.crt", cert=tls_dir / "client" / "tls.crt",
                            key=tls_dir / "client" / "tls.key")  # fmt: skip
    for tls in (foreign_client, distrusting, TlsConfig.from_dir(other_tls_dir)):
        async with AsapClient(tls_target, tls=tls, retries=0, timeout_s=10) as client:
            with pytest.raises(Unavailable):
                await client.prefill(tokens=[1, 2, 3])
    await _prefill_works(tls_target, TlsConfig.from_dir(tls_dir))


async def test_a_tls_client_cannot_talk_to_a_plaintext_server(tls_dir: Path) -> None:
    handle, target = await start_fake_scheduler(FakeScheduler())
    try:
        async with AsapClient(target, tls=TlsConfig.from_dir(tls_dir), retries=0, timeout_s=10) as client:
            with pytest.raises(Unavailable):
                await client.prefill(tokens=[1, 2, 3])
    finally:
        await handle.server.stop(None)
