"""Server scaffolding every ASAP service shares: options, health, reflection, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asap.auth import TokenAuth
from asap.faultbound import fault_bound_s, keepalive_time_s, ping_timeout_s
from asap.rpc.auth import TokenAuthInterceptor
from asap.rpc.tls import TlsConfig

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Explicit limit for every channel and server; chunking keeps real messages at 1-4 MiB."""

_KEEPALIVE_MS = int(keepalive_time_s(fault_bound_s()) * 1000)
_PING_TIMEOUT_MS = int(ping_timeout_s(fault_bound_s()) * 1000)

GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Detect a dead or frozen peer on a long-lived stream inside the fault bound (asap.faultbound), not
    # at the TCP timeout.
    ("grpc.keepalive_time_ms", _KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", _PING_TIMEOUT_MS),
    # grpc >= 1.6x times keepalive pings out by this (default 60 s), not by keepalive_timeout_ms: without
    # it a SIGSTOPped peer held a stream for a minute (measured: 20 s and counting without, 2.0 s with).
    ("grpc.http2.ping_timeout_ms", _PING_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
    # A peer that comes back (a restarted rank on its old address) is reconnected within a second, not
    # after grpc's default back-off of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *GRPC_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1_000),
    ("grpc.max_concurrent_streams", 1024),
    ("grpc.so_reuseport", 0),
)


@dataclass(slots=True)
class ServiceHandle:
    """A started gRPC server with its health servicer and bound port."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: tuple[str, ...]
    auth: TokenAuth | None = None
    """The bearer tokens its calls need (None: none); ``serve_until_signalled`` reloads them on SIGHUP."""

    async def set_serving(self) -> None:
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutdown(self, grace_s: float) -> None:
        """NOT_SERVING for every service, then stop the server, letting RPCs finish for ``grace_s``."""
        await self.set_not_serving()
        await self.server.stop(grace_s)

    async def set_not_serving(self) -> None:
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


async def create_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    *,
    tls: TlsConfig | None = None,
    auth: TokenAuth | None = None,
) -> ServiceHandle:
    """Create, bind and start a server; health starts NOT_SERVING until the caller is ready.

    ``address`` may use port 0; the bound port is returned in the handle. With ``tls`` the port speaks
    mutual TLS only (a client without a certificate signed by its CA is refused in the handshake); with
    ``auth`` every call but health and reflection needs an accepted bearer token (``asap.rpc.auth``).
    """
    interceptors = [TokenAuthInterceptor(auth)] if auth is not None else []
    server = grpc.aio.server(options=list(SERVER_OPTIONS), interceptors=interceptors)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.server_credentials())
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    handle = ServiceHandle(server, health_servicer, port, tuple(service_names), auth)
    await handle.set_not_serving()
    return handle


def bound_address(address: str, port: int) -> str:
    host = address.rsplit(":", 1)[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


async def serve_until_signalled(
    handle: ServiceHandle,
    *,
    drain: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 10.0,
) -> None:
    """Run until SIGINT/SIGTERM, then drain: NOT_SERVING, finish in-flight work, stop the server.
    A server with bearer tokens re-reads its token file on SIGHUP."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    auth = handle.auth
    if auth is not None:
        loop.add_signal_handler(signal.SIGHUP, auth.reload)
    try:
        await stop.wait()
        logger.info("shutdown requested; draining (grace %.1fs)", grace_s)
        await handle.health.enter_graceful_shutdown()
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), timeout=grace_s)
            except TimeoutError:
                logger.warning("drain did not finish within %.1fs; stopping anyway", grace_s)
        await handle.server.stop(grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    logger.info("stopped")


def run_async(main: Callable[[], Coroutine[Any, Any, None]], *, use_uvloop: bool = True) -> None:
    """Run ``main`` on uvloop when available (the default), else the stdlib loop."""
    if use_uvloop:
        try:
            import uvloop

            uvloop.run(main())
            return
        except ImportError:
            logger.warning("uvloop not installed; using the default asyncio loop")
    asyncio.run(main())


class Service(Protocol):
    """What ``run_service`` drives: a service with an explicit start/stop lifecycle."""

    handle: ServiceHandle | None

    async def start(self) -> str:
        """Load, bind, warm up, report SERVING; return the bound address."""
        ...

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving and release everything; safe to call on a partly started service."""
        ...

    async def drain(self) -> None:
        """Wait until the work in flight is finished (called on SIGTERM before the server stops)."""
        ...


async def run_service(service: Service, *, describe: str, tracing_name: str, grace_s: float) -> None:
    """The life of a service process: tracing, start (a failed start stops what did start), the ready
    line ``serving DESCRIBE at ADDRESS`` that launchers wait for (after ``metrics of DESCRIBE at URL`` when
    it serves metrics), serve until SIGINT/SIGTERM, drain, stop,
    and flush the spans still buffered."""
    from asap.telemetry import configure_tracing

    tracing = configure_tracing(tracing_name)
    try:
        try:
            address = await service.start()
        except BaseException:
            await service.stop(grace_s=0)
            raise
        metrics_url = getattr(service, "metrics_url", None)
        if metrics_url is not None:  # before the ready line, so launchers know it once the service is up
            print(f"metrics of {describe} at {metrics_url}", flush=True)
        print(f"serving {describe} at {address}", flush=True)
        if service.handle is None:
            raise RuntimeError(f"{describe} did not start")
        try:
            await serve_until_signalled(service.handle, drain=service.drain, grace_s=grace_s)
        finally:
            await service.stop(grace_s=0)
    finally:
        tracing.shutdown()
