"""Synthetic trace files with exactly known timings, written in the collector file-exporter format."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asap.telemetry import spans as names

BASE_NS = 1_700_000_000_000_000_000


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}


@dataclass
class Ref:
    """Where a span sits: its trace and span ids (hex)."""

    trace_id: str
    span_id: str


@dataclass
class TraceBuilder:
    """Collects spans per service; times in ms since ``BASE_NS``."""

    spans: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    _next: int = 0

    def _id(self, digits: int) -> str:
        self._next += 1
        return f"{self._next:0{digits}x}"

    def span(
        self,
        service: str,
        name: str,
        start_ms: float,
        end_ms: float,
        parent: Ref | None = None,
        links: tuple[Ref, ...] = (),
        **attributes: Any,
    ) -> Ref:
        ref = Ref(parent.trace_id if parent else self._id(32), self._id(16))
        raw: dict[str, Any] = {
            "traceId": ref.trace_id,
            "spanId": ref.span_id,
            "name": name,
            "kind": 1,
            "startTimeUnixNano": str(BASE_NS + int(start_ms * 1_000_000)),
            "endTimeUnixNano": str(BASE_NS + int(end_ms * 1_000_000)),
            "attributes": [
                {"key": k.replace("_", ".", 1), "value": _value(v)} for k, v in attributes.items()
            ],
        }
        if parent:
            raw["parentSpanId"] = parent.span_id
        if links:
            raw["links"] = [{"traceId": link.trace_id, "spanId": link.span_id} for link in links]
        self.spans[service].append(raw)
        return ref

    def write(self, path: Path) -> Path:
        """One TracesData line per service, appended."""
        with open(path, "a", encoding="utf-8") as file:
            for service, raw_spans in self.spans.items():
                resource = {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]}
                data = {
                    "resourceSpans": [
                        {
                            "resource": resource,
                            "scopeSpans": [{"scope": {"name": "asap"}, "spans": raw_spans}],
                        }
                    ]
                }
                file.write(json.dumps(data) + "\n")
        return path


SCHED, ATT0, EXP0, EXP1 = "asap-scheduler", "asap-attention-0", "asap-expert-0", "asap-expert-1"


def async_batch(b: TraceBuilder) -> None:
    """Requests r1 (0-100 ms) and r2 (5-100 ms) in one async batch; see test_summary for the sums."""
    r1 = b.span(SCHED, names.SCHEDULER_REQUEST, 0, 100, asap_request_id="r1", asap_mode="async")
    b.span(SCHED, names.SCHEDULER_QUEUE, 0, 10, parent=r1, asap_request_id="r1")
    r2 = b.span(SCHED, names.SCHEDULER_REQUEST, 5, 100, asap_request_id="r2", asap_mode="async")
    b.span(SCHED, names.SCHEDULER_QUEUE, 5, 10, parent=r2, asap_request_id="r2")
    batch = b.span(
        SCHED, names.SCHEDULER_BATCH, 10, 98, links=(r1, r2), asap_request_ids=["r1", "r2"], asap_rank=0
    )
    att = b.span(ATT0, names.ATTENTION_BATCH, 12, 96, parent=batch, links=(r1, r2), asap_rank=0)
    b.span(ATT0, names.ATTENTION_LAYER, 12, 30, parent=att, asap_layer=0)
    d0 = b.span(
        ATT0, names.ATTENTION_DISPATCH, 30, 32, parent=att, asap_layer=0, asap_expert_rank=0, asap_tokens=7
    )
    d1 = b.span(
        ATT0, names.ATTENTION_DISPATCH, 30, 33, parent=att, asap_layer=0, asap_expert_rank=1, asap_tokens=5
    )
    b.span(ATT0, names.ATTENTION_COMBINE_WAIT, 33, 60, parent=att, asap_layer=0)
    b.span(EXP0, names.EXPERT_QUEUE, 34, 40, parent=d0, asap_layer=0, asap_tokens=7, asap_attention_rank=0)
    b.span(EXP0, names.EXPERT_COMPUTE, 40, 50, parent=d0, asap_layer=0, asap_tokens=7)
    b.span(EXP0, names.EXPERT_COMBINE_SEND, 50, 51, parent=d0)
    b.span(EXP1, names.EXPERT_QUEUE, 35, 45, parent=d1, asap_layer=0, asap_tokens=5, asap_attention_rank=0)
    b.span(EXP1, names.EXPERT_COMPUTE, 45, 55, parent=d1, asap_layer=0, asap_tokens=5)
    b.span(EXP1, names.EXPERT_COMBINE_SEND, 55, 57, parent=d1)
    b.span(ATT0, names.ATTENTION_LAYER, 60, 85, parent=att, asap_layer=1)
    b.span(ATT0, names.ATTENTION_SAMPLE, 85, 90, parent=att)


def sync_batch(b: TraceBuilder, offset: float = 0.0) -> None:
    """Request s1 (0-50 ms + offset) in sync mode with a 15 ms barrier wait on expert rank 0."""
    o = offset
    s1 = b.span(SCHED, names.SCHEDULER_REQUEST, o + 0, o + 50, asap_request_id="s1", asap_mode="sync")
    b.span(SCHED, names.SCHEDULER_QUEUE, o + 0, o + 5, parent=s1)
    batch = b.span(SCHED, names.SCHEDULER_BATCH, o + 5, o + 49, links=(s1,), asap_request_ids=["s1"])
    att = b.span(ATT0, names.ATTENTION_BATCH, o + 6, o + 48, parent=batch, links=(s1,))
    b.span(ATT0, names.ATTENTION_LAYER, o + 6, o + 16, parent=att, asap_layer=0)
    d0 = b.span(ATT0, names.ATTENTION_DISPATCH, o + 16, o + 17, parent=att, asap_layer=0, asap_expert_rank=0)
    b.span(ATT0, names.ATTENTION_COMBINE_WAIT, o + 17, o + 45, parent=att, asap_layer=0)
    b.span(EXP0, names.EXPERT_QUEUE, o + 18, o + 20, parent=d0, asap_layer=0)
    b.span(EXP0, names.SYNC_BARRIER_WAIT, o + 20, o + 35, parent=d0, asap_layer=0, asap_step=1)
    b.span(EXP0, names.EXPERT_COMPUTE, o + 35, o + 42, parent=d0, asap_layer=0)
    b.span(EXP0, names.EXPERT_COMBINE_SEND, o + 42, o + 43, parent=d0)
    b.span(ATT0, names.ATTENTION_SAMPLE, o + 45, o + 47, parent=att)
