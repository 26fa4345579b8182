"""Per-service tracing set-up from the standard ``OTEL_*`` environment variables.

Tracing is **off** unless configured; then :func:`get_tracer` returns a tracer whose
``start_as_current_span`` hands back one shared, inert context manager (no context attach, no
allocation), and :func:`tracing_enabled` is ``False`` so hot loops can skip building attributes.

Variables read by :func:`configure_tracing`:

- ``OTEL_SDK_DISABLED=true``: off, whatever else is set.
- ``OTEL_TRACES_EXPORTER``: comma list of ``otlp``, ``console``, ``none``. When unset, ``otlp`` if
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, else nothing (unlike
  the SDK's own default, an unconfigured service does not try to reach localhost:4317).
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc`` (default) or
  ``http/protobuf``. Endpoint, headers, timeout and TLS are read by the OTLP exporters themselves.
- ``ASAP_TRACE_FILE=PATH``: also append OTLP/JSON lines to PATH (see ``asap.telemetry.fileexport``).

Every exporter sits behind a ``BatchSpanProcessor``. Without ``opentelemetry-sdk`` installed everything
here is a no-op and :func:`configure_tracing` returns a disabled handle.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


class _InertSpan:
    """Stands in for a span when OpenTelemetry is not installed: every method accepts and ignores."""

    def is_recording(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return _ignore

    def __enter__(self) -> _InertSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


try:
    from opentelemetry import trace as _trace

    _INVALID_SPAN: Any = _trace.INVALID_SPAN
    _TracerBase: Any = _trace.NoOpTracer
except ImportError:  # pragma: no cover - the GPU image has no OpenTelemetry
    _trace = None  # type: ignore[assignment]
    _INVALID_SPAN = _InertSpan()
    _TracerBase = object

logger = logging.getLogger(__name__)

TRACE_FILE_ENV = "ASAP_TRACE_FILE"
EXPORTER_NAMES = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")

# True while a configured provider is active. Read it as ``setup.TRACING_ENABLED`` (or call
# ``tracing_enabled()``); ``from ... import TRACING_ENABLED`` would copy the value at import time.
TRACING_ENABLED = False
_provider: TracerProvider | None = None
_global_set = False


class _NoopTracer(_TracerBase):  # type: ignore[misc]
    """Tracer used while tracing is off: every span is the shared invalid span, nothing is attached."""

    _null = contextlib.nullcontext(_INVALID_SPAN)

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        return _INVALID_SPAN

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._null


_NOOP_TRACER: Any = _NoopTracer()


def tracing_enabled() -> bool:
    """Whether spans are being recorded in this process."""
    return TRACING_ENABLED


def get_tracer(name: str = "asap") -> Tracer:
    """The tracer of the configured provider, or the free no-op tracer while tracing is off."""
    if _provider is None:
        return _NOOP_TRACER  # type: ignore[no-any-return]
    return _provider.get_tracer(name)


@dataclass
class TracingHandle:
    """What :func:`configure_tracing` set up; call :meth:`shutdown` when the service stops."""

    service_name: str
    exporters: list[str] = field(default_factory=list)
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        """Whether this handle records spans."""
        return self.provider is not None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every finished span now; ``True`` when all exporters succeeded."""
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True

    def shutdown(self) -> None:
        """Flush and stop the exporters; tracing is off afterwards. Safe to call twice."""
        global TRACING_ENABLED, _provider
        provider, self.provider = self.provider, None
        if provider is None:
            return
        if _provider is provider:
            _provider = None
            TRACING_ENABLED = False
        provider.shutdown()


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    raw = env.get("OTEL_TRACES_EXPORTER")
    if raw is None:
        has_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        names = ["otlp"] if has_endpoint else []
    else:
        names = [part.strip().lower() for part in raw.split(",") if part.strip()]
    unknown = [name for name in names if name not in EXPORTER_NAMES]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER={raw!r}: unknown exporter(s) {unknown}; use {EXPORTER_NAMES}")
    return [name for name in dict.fromkeys(names) if name != "none"]


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    # The endpoint is passed explicitly because ``env`` need not be os.environ; headers, TLS and
    # timeouts are left to the exporters' own OTEL_* handling.
    protocol = _protocol_label(env)
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=traces_endpoint or base_endpoint)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # As the spec says: the per-signal endpoint is used as is, the base one gets /v1/traces.
        if not traces_endpoint and base_endpoint:
            traces_endpoint = base_endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=traces_endpoint)
    raise ValueError(f"OTLP trace protocol {protocol!r} is not supported; use one of {PROTOCOLS}")


def build_exporters(env: Mapping[str, str]) -> list[tuple[str, SpanExporter]]:
    """The ``(name, exporter)`` pairs the environment asks for; empty means tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    exporters: list[tuple[str, SpanExporter]] = []
    for name in _exporter_names(env):
        if name == "otlp":
            exporters.append((f"otlp/{_protocol_label(env)}", _otlp_exporter(env)))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(("console", ConsoleSpanExporter()))
    trace_file = env.get(TRACE_FILE_ENV)
    if trace_file:
        from asap.telemetry.fileexport import JsonLinesSpanExporter

        exporters.append((f"file:{trace_file}", JsonLinesSpanExporter(trace_file)))
    return exporters


def _protocol_label(env: Mapping[str, str]) -> str:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return (protocol or "grpc").strip()


def configure_tracing(service_name: str, env: Mapping[str, str] | None = None) -> TracingHandle:
    """Set up tracing for this process as ``service_name`` (e.g. ``asap-attention-0``).

    ``env`` defaults to ``os.environ``. Raises ``ValueError`` naming the variable when it holds an
    unknown exporter or protocol. The provider also becomes OpenTelemetry's global one (first call
    only), so library instrumentation such as opentelemetry-instrumentation-grpc uses it.
    """
    global TRACING_ENABLED, _provider, _global_set
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logger.info("tracing: opentelemetry-sdk is not installed; tracing is off")
        return TracingHandle(service_name)
    exporters = build_exporters(os.environ if env is None else env)
    if not exporters:
        return TracingHandle(service_name)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    for _, exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if _provider is not None:
        logger.warning("tracing: configure_tracing called again; the previous provider stays until shut down")
    _provider = provider
    TRACING_ENABLED = True
    if not _global_set:
        _trace.set_tracer_provider(provider)
        _global_set = True
    names = [name for name, _ in exporters]
    logger.info("tracing: %s exporting to %s", service_name, ", ".join(names))
    return TracingHandle(service_name, names, provider)
