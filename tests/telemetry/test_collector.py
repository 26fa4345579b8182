"""The OTLP/gRPC collector: real SDK exporters in, collector file-exporter JSON lines out."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from asap.telemetry import spans
from asap.telemetry.collector import TraceCollector, start_collector


def _parse_line(line: str) -> TracesData:
    """Parse an OTLP/JSON line strictly, mapping its hex ids back to protobuf's base64 bytes."""
    data = json.loads(line)
    for resource in data["resourceSpans"]:
        for scope in resource["scopeSpans"]:
            for span in scope["spans"]:
                for obj in (span, *span.get("links", [])):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if obj.get(key):
                            obj[key] = base64.b64encode(bytes.fromhex(obj[key])).decode()
    return json_format.ParseDict(data, TracesData())


def test_sdk_exporter_to_collector(tmp_path: Path) -> None:
    out = tmp_path / "traces.jsonl"
    handle = start_collector("127.0.0.1:0", out)
    try:
        assert handle.address.startswith("127.0.0.1:") and not handle.address.endswith(":0")
        provider = TracerProvider(resource=Resource.create({"service.name": "asap-scheduler"}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=handle.endpoint, insecure=True))
        )
        tracer = provider.get_tracer("test")
        with (
            tracer.start_as_current_span(
                spans.SCHEDULER_REQUEST, attributes={spans.REQUEST_ID: "r7"}
            ) as request,
            tracer.start_as_current_span(spans.SCHEDULER_QUEUE),
        ):
            link = spans.link_from(*spans.inject())
        assert link is not None
        with tracer.start_as_current_span(
            spans.SCHEDULER_BATCH, links=[link], attributes={spans.REQUEST_IDS: ["r7"]}
        ):
            pass
        provider.shutdown()  # flushes through the exporter before returning
    finally:
        handle.stop()
    handle.stop()
    messages = [_parse_line(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert messages
    received = [s for m in messages for r in m.resource_spans for ss in r.scope_spans for s in ss.spans]
    by_name = {s.name: s for s in received}
    assert set(by_name) == {spans.SCHEDULER_REQUEST, spans.SCHEDULER_QUEUE, spans.SCHEDULER_BATCH}
    request_trace = request.get_span_context().trace_id.to_bytes(16, "big")
    assert by_name[spans.SCHEDULER_REQUEST].trace_id == request_trace
    assert by_name[spans.SCHEDULER_QUEUE].parent_span_id == by_name[spans.SCHEDULER_REQUEST].span_id
    assert by_name[spans.SCHEDULER_BATCH].links[0].trace_id == request_trace
    assert by_name[spans.SCHEDULER_BATCH].trace_id != request_trace


async def test_async_collector_writes_one_line_per_export(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "traces.jsonl"
    span = Span(
        trace_id=bytes(range(16)), span_id=bytes(range(8)), name="expert.compute", start_time_unix_nano=5
    )
    request = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    async with TraceCollector("127.0.0.1:0", out) as collector:
        async with grpc.aio.insecure_channel(collector.address) as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)  # type: ignore[no-untyped-call]
            await stub.Export(request)
            await stub.Export(trace_service_pb2.ExportTraceServiceRequest())  # empty: nothing written
            await stub.Export(request)
        assert (collector.exports, collector.spans) == (2, 2)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    raw = json.loads(lines[0])["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert raw["traceId"] == bytes(range(16)).hex() and raw["startTimeUnixNano"] == "5"


def test_bad_listen_address(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        TraceCollector("localhost", tmp_path / "x.jsonl")


def test_cli_collect_serves_until_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    command = [
        sys.executable,
        "-m",
        "asap.cli",
        "trace",
        "collect",
        "--listen",
        "127.0.0.1:0",
        "--out",
        str(out),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().strip()
            assert ready.startswith("collecting traces at 127.0.0.1:") and ready.endswith(f"-> {out}")
            endpoint = f"http://{ready.split()[3]}"
            provider = TracerProvider()
            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
            )
            with provider.get_tracer("t").start_as_current_span(spans.EXPERT_QUEUE):
                pass
            provider.shutdown()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
            assert proc.returncode == 0, stderr
            assert "collected 1 spans in 1 exports" in stderr
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [
        s.name for s in _parse_line(out.read_text(encoding="utf-8")).resource_spans[0].scope_spans[0].spans
    ] == [spans.EXPERT_QUEUE]
