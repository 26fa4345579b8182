"""``GrpcService``: the lifecycle shape the scheduler, attention and expert services share.

Each service process is one of these: ``start`` loads, binds (port 0 allowed), warms up and reports
SERVING; ``drain`` waits for the work in flight (on SIGTERM); ``stop`` releases everything and is safe on
a partly started service; ``run_forever`` is the process's whole life (``asap.rpc.server.run_service``).
The base holds the server handle, the bound address and the stop grace; a service implements ``start``,
``shutdown`` (the order its parts are released in) and ``drain``.

Metrics: a service whose config sets ``metrics_port`` calls ``start_metrics`` in ``start`` (before
SERVING) with its collectors and ``stop_metrics`` in ``shutdown``; ``metrics_url`` then names its
endpoint (``asap.metrics.export``; prometheus_client is imported only then).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from asap.errors import InternalError
from asap.rpc.server import ServiceHandle, bound_address, run_service

if TYPE_CHECKING:
    from asap.metrics.export import Collector, MetricsServer

__all__ = ["GrpcService", "ServiceConfig"]


class ServiceConfig(Protocol):
    """What the base needs of a service's config."""

    @property
    def address(self) -> str:
        """The address to bind (``host:port``, port 0 for any)."""
        ...

    @property
    def drain_timeout_s(self) -> float:
        """How long in-flight work may take to finish on SIGTERM (and the default stop grace)."""
        ...


class GrpcService(ABC):
    """A service with an explicit start/drain/stop lifecycle around one gRPC server."""

    def __init__(self, config: ServiceConfig, *, describe: str, tracing_name: str) -> None:
        self._service_config = config
        self.describe = describe
        """How the ready line names it: ``serving DESCRIBE at ADDRESS``."""
        self.tracing_name = tracing_name
        """The ``service.name`` of its spans."""
        self.handle: ServiceHandle | None = None
        """The started server (None before ``start`` and after ``stop``)."""
        self.metrics: MetricsServer | None = None
        """The ``/metrics`` endpoint while it serves (None when ``metrics_port`` is not set)."""

    @property
    def address(self) -> str:
        """The address the server is bound to (the real port when configured with port 0)."""
        if self.handle is None:
            raise InternalError("service not started")
        return bound_address(self._service_config.address, self.handle.port)

    @property
    def metrics_url(self) -> str | None:
        """``http://HOST:PORT/metrics`` while metrics are served, else None."""
        return self.metrics.url if self.metrics is not None else None

    def start_metrics(self, collectors: Callable[[], Sequence[Collector]]) -> None:
        """Serve ``/metrics`` on the config's ``metrics_port`` (0: a free port), if it is set; the
        collectors are built only then. Call on the service's event loop."""
        port: int | None = getattr(self._service_config, "metrics_port", None)
        if port is None or self.metrics is not None:
            return
        from asap.metrics.export import MetricsServer

        host = self._service_config.address.rsplit(":", 1)[0] or "127.0.0.1"
        server = MetricsServer(collectors(), host=host.strip("[]"), port=port)
        server.start()
        self.metrics = server

    async def stop_metrics(self) -> None:
        """Stop serving ``/metrics`` (off the event loop: the HTTP server's shutdown polls); idempotent."""
        server, self.metrics = self.metrics, None
        if server is not None:
            await asyncio.get_running_loop().run_in_executor(None, server.close)

    @abstractmethod
    async def start(self) -> str:
        """Load, bind, warm up, report SERVING; return the bound address."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until the work in flight is finished (called on SIGTERM before the server stops)."""

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving and release everything, letting RPCs finish for ``grace_s`` (default: the drain
        timeout); safe to call on a partly started service, and twice."""
        await self.shutdown(self._service_config.drain_timeout_s if grace_s is None else grace_s)

    @abstractmethod
    async def shutdown(self, grace_s: float) -> None:
        """Release the service's parts in its order; each part that exists is released once (set to None)."""

    async def stop_server(self, grace_s: float) -> None:
        """NOT_SERVING, then stop the server with ``grace_s`` for the RPCs in progress (if started)."""
        if self.handle is not None:
            await self.handle.shutdown(grace_s)
            self.handle = None

    async def run_forever(self) -> None:
        """The life of the service process: start, serve until SIGINT/SIGTERM, drain, stop."""
        await run_service(
            self,
            describe=self.describe,
            tracing_name=self.tracing_name,
            grace_s=self._service_config.drain_timeout_s,
        )
