"""OpenTelemetry tracing for ASAP.

- ``spans``: the span contract (names, attribute keys, trace-context helpers);
- ``configure_tracing`` / ``get_tracer`` / ``tracing_enabled``: per-service set-up, off by default;
- ``start_collector``: an in-process OTLP/gRPC receiver writing a trace file (``asap trace collect``).
"""

from __future__ import annotations

from asap.telemetry import spans
from asap.telemetry.setup import TracingHandle, configure_tracing, get_tracer, tracing_enabled

__all__ = ["TracingHandle", "configure_tracing", "get_tracer", "spans", "tracing_enabled"]
