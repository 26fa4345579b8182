"""A span exporter appending OTLP/JSON ``TracesData`` lines to a file (``ASAP_TRACE_FILE``).

Several processes may append to one file: each export is a single ``write`` on an ``O_APPEND`` descriptor,
so lines from different services do not interleave.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from asap.telemetry.otlpjson import traces_data_line


class JsonLinesSpanExporter(SpanExporter):
    """Writes each exported batch of spans as one OpenTelemetry Collector file-exporter line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        request = encode_spans(spans)
        data = traces_data_line(list(request.resource_spans)).encode("utf-8")
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            view = memoryview(data)
            while view:  # a regular file takes it all at once; loop in case it does not
                view = view[os.write(self._fd, view) :]
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is written straight to the descriptor

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
