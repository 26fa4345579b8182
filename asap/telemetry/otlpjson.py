"""Trace files: JSON lines in the OpenTelemetry Collector file-exporter format, written and read.

Each line is one OTLP/JSON ``TracesData`` object, ``{"resourceSpans": [...]}``, following the OTLP JSON
encoding rules: lowerCamelCase field names, trace and span ids as lowercase hex (not base64), enums as
integers, 64-bit integers (``startTimeUnixNano``...) as decimal strings.

Writing uses ``opentelemetry-proto`` (imported lazily); reading needs only the standard library, so the
analysis commands work where OpenTelemetry is not installed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

AttrValue = str | int | float | bool | list[Any] | None

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_ids(obj: dict[str, Any]) -> None:
    for key in _ID_FIELDS:
        if obj.get(key):
            obj[key] = _b64_to_hex(obj[key])


def traces_data_line(resource_spans: list[ResourceSpans]) -> str:
    """One JSON line (with trailing newline) holding ``TracesData(resource_spans=...)``."""
    from google.protobuf import json_format
    from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

    message = TracesData(resource_spans=resource_spans)
    data = json_format.MessageToDict(message, use_integers_for_enums=True)
    # protobuf's JSON mapping writes bytes as base64; OTLP/JSON wants hex ids.
    for resource in data.get("resourceSpans", []):
        for scope in resource.get("scopeSpans", []):
            for span in scope.get("spans", []):
                _hex_ids(span)
                for link in span.get("links", []):
                    _hex_ids(link)
    return json.dumps(data, separators=(",", ":")) + "\n"


def _any_value(value: dict[str, Any]) -> AttrValue:
    if "stringValue" in value:
        return str(value["stringValue"])
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [_any_value(v) for v in value["arrayValue"].get("values", [])]
    return None


def _attributes(raw: list[dict[str, Any]] | None) -> dict[str, AttrValue]:
    return {item["key"]: _any_value(item.get("value", {})) for item in raw or []}


@dataclass(slots=True)
class SpanLink:
    """A link from one span to another span (possibly in another trace)."""

    trace_id: str
    span_id: str


@dataclass(slots=True)
class SpanRecord:
    """One finished span as read from a trace file; times in nanoseconds since the Unix epoch."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    links: list[SpanLink] = field(default_factory=list)

    @property
    def duration_ns(self) -> int:
        """``end_ns - start_ns``, never negative."""
        return max(0, self.end_ns - self.start_ns)

    def int_attr(self, key: str) -> int | None:
        """Attribute ``key`` as an int, or ``None`` when absent or not a number."""
        value = self.attributes.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return int(value)


def _id(value: str | None) -> str:
    """Hex id; tolerates base64 ids written by tools that skip the OTLP/JSON id rule."""
    if not value:
        return ""
    try:
        int(value, 16)
        return value.lower()
    except ValueError:
        return _b64_to_hex(value)


def spans_from_traces_data(data: dict[str, Any]) -> Iterator[SpanRecord]:
    """The spans of one OTLP/JSON ``TracesData`` object."""
    for resource in data.get("resourceSpans", []):
        resource_attrs = _attributes(resource.get("resource", {}).get("attributes"))
        service = str(resource_attrs.get("service.name") or "unknown_service")
        for scope in resource.get("scopeSpans", []):
            for raw in scope.get("spans", []):
                yield SpanRecord(
                    service=service,
                    name=str(raw.get("name", "")),
                    trace_id=_id(raw.get("traceId")),
                    span_id=_id(raw.get("spanId")),
                    parent_span_id=_id(raw.get("parentSpanId")),
                    start_ns=int(raw.get("startTimeUnixNano", 0)),
                    end_ns=int(raw.get("endTimeUnixNano", 0)),
                    attributes=_attributes(raw.get("attributes")),
                    links=[
                        SpanLink(_id(link.get("traceId")), _id(link.get("spanId")))
                        for link in raw.get("links", [])
                    ],
                )


def load_spans(path: str | Path) -> list[SpanRecord]:
    """Every span in a JSON-lines trace file, in file order. Blank lines are skipped.

    Raises ``ValueError`` naming the line when a line is not JSON (e.g. a truncated last line).
    """
    records: list[SpanRecord] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from None
            records.extend(spans_from_traces_data(data))
    return records
