"""Tracing of a request through the scheduler: its W3C context and its ``scheduler.request`` and
``scheduler.queue`` spans (``scheduler.batch`` spans are opened by the attention client)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from asap.errors import AsapError
from asap.telemetry import setup, spans
from asap.v1 import scheduler_pb2
from scheduler_svc.requests import ScheduledRequest

if TYPE_CHECKING:
    from opentelemetry.trace import Span


def trace_context(request: scheduler_pb2.PrefillRequest) -> tuple[str, str]:
    """(traceparent, tracestate): the caller's W3C context if it sent one, else a new trace."""
    parts = request.trace.traceparent.split("-")
    if len(parts) == 4 and len(parts[1]) == 32:
        return request.trace.traceparent, request.trace.tracestate
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01", ""


def _start_request_spans(
    request: scheduler_pb2.PrefillRequest, scheduled: ScheduledRequest, mode: str, arrival_ns: int
) -> Span:
    """Open ``scheduler.request`` (under the client's span when it sent one, else a new trace) and its
    ``scheduler.queue`` child; the request then carries the request span's context to its rank."""
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind

    tracer = setup.get_tracer()
    span = tracer.start_span(
        spans.SCHEDULER_REQUEST,
        context=spans.extract_from(request.trace) or Context(),
        kind=SpanKind.SERVER,
        start_time=arrival_ns,
        attributes={
            spans.REQUEST_ID: scheduled.request_id,
            spans.MODE: mode,
            spans.TOKENS: scheduled.prompt_tokens,
        },
    )
    context = spans.context_of(span)
    scheduled.queue_span = tracer.start_span(spans.SCHEDULER_QUEUE, context=context, start_time=arrival_ns)
    scheduled.traceparent, scheduled.tracestate = spans.inject(context)
    return span


def _mark_failed(span: Span, exc: BaseException) -> None:
    spans.set_error(span, exc.message if isinstance(exc, AsapError) else type(exc).__name__)


class RequestAnswered:
    """Where ``scheduler.request`` ends: at the request's result when it has one (its TTFT as the
    scheduler reports it: the span and ``ttft_ms`` are one measure), else when the failure is raised."""

    def __init__(self, arrival_ns: int) -> None:
        self._arrival_ns = arrival_ns
        self.end_ns: int | None = None

    def at_ttft(self, ttft_ms: float) -> None:
        self.end_ns = self._arrival_ns + round(ttft_ms * 1e6)


@contextmanager
def request_spans(
    request: scheduler_pb2.PrefillRequest, scheduled: ScheduledRequest, mode: str, arrival_ns: int
) -> Iterator[RequestAnswered]:
    """The request's spans around its scheduling (tracing on): opened at ``arrival_ns``, marked failed if
    it fails, ended (its queue span too, if no batch ended it) at its result's time (``RequestAnswered``),
    or when it fails."""
    span = _start_request_spans(request, scheduled, mode, arrival_ns)
    answered = RequestAnswered(arrival_ns)
    try:
        yield answered
    except BaseException as exc:
        _mark_failed(span, exc)
        raise
    finally:
        scheduled.end_queue_span()
        span.end(end_time=answered.end_ns)
