"""Serving ``/metrics``: a per-service registry, read on the service's event loop, over HTTP.

Each service builds its own ``CollectorRegistry`` (never prometheus_client's global one), so several
services in one process (the tests) never collide. Its collectors read state the event loop owns (queues,
rank tables): ``MetricsServer`` runs their ``collect`` on that loop (one call per scrape), while the HTTP
server (prometheus_client's, a daemon thread) does the rest. Process metrics (CPU, memory, file
descriptors) come from prometheus_client's ``ProcessCollector``.

Port semantics (``--metrics-port``): not given = no metrics server; ``0`` = a free port chosen by the
OS, which the service prints (``metrics of SERVICE at http://HOST:PORT/metrics``); else that port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Iterable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from asap.errors import Unavailable
from asap.metrics.recorders import DistributionSnapshot

__all__ = [
    "Collector",
    "CounterMetricFamily",
    "GaugeMetricFamily",
    "Metric",
    "MetricsServer",
    "histogram",
]

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 5.0
"""How long a scrape waits for the event loop (a loop blocked longer answers 500)."""


def histogram(
    name: str,
    documentation: str,
    snapshots: Iterable[tuple[Sequence[str], DistributionSnapshot]],
    labels: Sequence[str] = (),
) -> HistogramMetricFamily:
    """A histogram family from recorder snapshots, one per label value tuple."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for values, snap in snapshots:
        buckets = [(_le(bound), count) for bound, count in zip(snap.bounds, snap.cumulative, strict=False)]
        buckets.append(("+Inf", snap.count))
        family.add_metric(list(values), buckets, snap.sum)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


class _OnLoop(Collector):
    """Runs the service's collectors on its event loop, so they read loop-owned state safely."""

    def __init__(self, collectors: Sequence[Collector], loop: asyncio.AbstractEventLoop) -> None:
        self._collectors = list(collectors)
        self._loop = loop

    def _gather(self) -> list[Metric]:
        return [metric for collector in self._collectors for metric in collector.collect()]

    def collect(self) -> Iterable[Metric]:
        if self._loop.is_closed():
            raise Unavailable("the service's event loop is closed")
        try:
            if asyncio.get_running_loop() is self._loop:  # called on the loop itself (tests)
                return self._gather()
        except RuntimeError:
            pass  # no loop in this thread: the HTTP server's
        done: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(self._gather())
            except BaseException as exc:
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result(SCRAPE_TIMEOUT_S)


class MetricsServer:
    """One service's ``/metrics`` endpoint. ``start`` binds (port 0: a free port); ``close`` is idempotent."""

    def __init__(self, collectors: Sequence[Collector], *, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=False)
        self._collectors = collectors
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> int:
        """Register the collectors (read on ``loop``, default: the running one) and serve; returns the
        bound port."""
        loop = loop or asyncio.get_running_loop()
        self.registry.register(_OnLoop(self._collectors, loop))
        ProcessCollector(registry=self.registry)
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise Unavailable(f"cannot serve metrics on {self.host}:{self.port}: {exc}") from exc
        self.port = int(self._server.server_port)
        logger.info("metrics at %s", self.url)
        return self.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"http://{host}:{self.port}/metrics"

    def scrape(self) -> bytes:
        """The exposition text a scrape would get (tests, ``asap`` tools)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(5)
