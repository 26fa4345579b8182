"""The W3C context a request carries through the scheduler (tracing on or off)."""

from __future__ import annotations

from asap.v1 import scheduler_pb2
from scheduler_svc.tracing import trace_context

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_the_callers_context_is_kept() -> None:
    request = scheduler_pb2.PrefillRequest()
    request.trace.traceparent, request.trace.tracestate = CALLER, "vendor=1"
    assert trace_context(request) == (CALLER, "vendor=1")


def test_a_missing_or_malformed_context_starts_a_new_trace() -> None:
    for traceparent in ("", "00-short-b7ad6b7169203331-01", "garbage"):
        request = scheduler_pb2.PrefillRequest()
        request.trace.traceparent = traceparent
        new, state = trace_context(request)
        version, trace_id, span_id, flags = new.split("-")
        assert (version, len(trace_id), len(span_id), flags, state) == ("00", 32, 16, "01", "")
