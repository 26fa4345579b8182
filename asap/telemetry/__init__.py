"""OpenTelemetry tracing for ASAP: the span contract (``spans``), per-service set-up and trace tools."""

from __future__ import annotations

from asap.telemetry import spans

__all__ = ["spans"]
