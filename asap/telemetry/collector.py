"""An OTLP/gRPC trace receiver that appends what it receives to a JSON-lines trace file.

Each ``TraceService.Export`` request becomes one line of the OpenTelemetry Collector file-exporter
format (``asap.telemetry.otlpjson``), flushed before the call is answered, so a local cluster can be
traced with no external collector. Point services at it with
``OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT``.

Two ways to run it: :class:`TraceCollector` on the caller's event loop (``await start()`` /
``await stop()``), or :func:`start_collector`, which runs one on a background thread for synchronous
callers such as ``asap up``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import IO, Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from asap.telemetry.otlpjson import traces_data_line

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _split_listen(listen: str) -> str:
    """The host part of ``HOST:PORT`` (``[v6]:PORT`` allowed); raises ``ValueError`` when malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    return host


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, collector: TraceCollector) -> None:
        self._collector = collector

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._collector.write(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceCollector:
    """OTLP/gRPC ``TraceService`` writing one TracesData JSON line per export to ``out`` (appended)."""

    def __init__(self, listen: str, out: str | Path) -> None:
        self._host = _split_listen(listen)
        self.listen = listen
        self.out = Path(out)
        self.address = ""  # HOST:PORT actually bound, set by start()
        self.exports = 0
        self.spans = 0
        self._server: Any = None
        self._file: IO[str] | None = None

    def write(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Append ``request`` as one line and flush it."""
        if self._file is None or not request.resource_spans:
            return
        self._file.write(traces_data_line(list(request.resource_spans)))
        self._file.flush()
        self.exports += 1
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)

    async def start(self) -> str:
        """Bind and serve; returns ``HOST:PORT`` (the real port when ``listen`` asked for port 0)."""
        if self._server is not None:
            return self.address
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out, "a", encoding="utf-8")  # noqa: ASYNC230, SIM115 - once, at start; closed by stop()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)  # type: ignore[no-untyped-call]
        try:
            port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            self._file.close()
            self._file = None
            raise OSError(f"cannot listen on {self.listen}: {exc}") from exc
        await server.start()
        self._server = server
        self.address = f"{self._host}:{port}"
        logger.info("trace collector: listening at %s -> %s", self.address, self.out)
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        """Finish in-flight exports (up to ``grace`` seconds), then close the file. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        if self._file is not None:
            self._file.close()
            self._file = None

    async def __aenter__(self) -> TraceCollector:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class CollectorHandle:
    """A :class:`TraceCollector` running on its own thread and event loop; see :func:`start_collector`."""

    def __init__(self, collector: TraceCollector) -> None:
        self.collector = collector
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="asap-trace-collector", daemon=True)

    @property
    def address(self) -> str:
        """``HOST:PORT`` the collector listens on."""
        return self.collector.address

    @property
    def endpoint(self) -> str:
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``http://HOST:PORT``)."""
        return f"http://{self.address}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.collector.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.collector.stop()

    def start(self, timeout: float = 10.0) -> CollectorHandle:
        """Start the thread and wait until the collector listens; re-raises its start-up error."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"trace collector did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, flush and close the file, join the thread. Safe to call twice."""
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)


def start_collector(listen: str, out: str | Path) -> CollectorHandle:
    """Run a collector on a background thread: ``h = start_collector("127.0.0.1:0", path)``.

    ``h.address`` is the bound ``HOST:PORT``, ``h.endpoint`` the ``OTEL_EXPORTER_OTLP_ENDPOINT`` value
    for the services; ``h.stop()`` flushes and closes the file.
    """
    return CollectorHandle(TraceCollector(listen, out)).start()
