"""Trace-context helpers of the span contract."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from asap.telemetry import spans
from asap.v1 import common_pb2


def test_names_are_unique_and_namespaced() -> None:
    assert len(set(spans.SPAN_NAMES)) == len(spans.SPAN_NAMES) == 13
    keys = [spans.REQUEST_ID, spans.REQUEST_IDS, spans.LAYER, spans.MICRO_BATCH, spans.TOKENS, spans.RANK]
    keys += [spans.EXPERT_RANK, spans.ATTENTION_RANK, spans.STEP, spans.MODE, spans.TRANSFER_NS]
    assert all(key.startswith("asap.") for key in keys) and len(set(keys)) == 11
    assert (spans.attention_service(2), spans.expert_service(0)) == ("asap-attention-2", "asap-expert-0")


def test_without_a_span_nothing_is_injected() -> None:
    assert spans.inject() == ("", "")
    carrier = common_pb2.TraceContext()
    spans.inject_into(carrier)
    assert carrier.traceparent == ""
    assert spans.extract("") is None
    assert spans.extract("00-garbage") is None
    assert spans.link_from("") is None


def test_round_trip_through_the_proto_carrier() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("sender") as sender:
        carrier = common_pb2.TraceContext()
        spans.inject_into(carrier)
    sent = sender.get_span_context()
    assert carrier.traceparent == f"00-{sent.trace_id:032x}-{sent.span_id:016x}-{sent.trace_flags:02x}"
    with tracer.start_as_current_span("receiver", context=spans.extract_from(carrier)) as receiver:
        assert spans.inject()[0].split("-")[1] == f"{sent.trace_id:032x}"
    assert isinstance(receiver, ReadableSpan)
    assert receiver.get_span_context().trace_id == sent.trace_id
    assert receiver.parent is not None and receiver.parent.span_id == sent.span_id
    assert receiver.parent.is_remote


def test_tracestate_survives() -> None:
    tracer = TracerProvider().get_tracer("test")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with tracer.start_as_current_span("child", context=spans.extract(parent, "vendor=abc")):
        traceparent, tracestate = spans.inject()
    assert traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert tracestate == "vendor=abc"


def test_links_point_at_each_request() -> None:
    tracer = TracerProvider().get_tracer("test")
    carriers = []
    for _ in range(3):
        with tracer.start_as_current_span("request"):
            carrier = common_pb2.TraceContext()
            spans.inject_into(carrier)
            carriers.append(carrier)
    carriers.append(common_pb2.TraceContext())  # a request without context is skipped
    links = spans.links_from(carriers)
    assert [f"{link.context.trace_id:032x}" for link in links] == [
        c.traceparent.split("-")[1] for c in carriers[:3]
    ]
    with tracer.start_as_current_span("batch", links=links) as batch:
        assert isinstance(batch, ReadableSpan)
    assert [link.context.span_id for link in batch.links] == [link.context.span_id for link in links]
