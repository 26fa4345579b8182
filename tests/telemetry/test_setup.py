"""Exporter selection from the OTEL_* environment, and tracing off by default."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor, SpanExportResult

from asap.telemetry import setup, spans
from asap.telemetry.fileexport import JsonLinesSpanExporter
from asap.telemetry.otlpjson import load_spans
from asap.telemetry.setup import TracingHandle, build_exporters, configure_tracing, get_tracer


@pytest.fixture
def handles() -> Iterator[list[TracingHandle]]:
    made: list[TracingHandle] = []
    yield made
    for handle in made:
        handle.shutdown()
    assert not setup.tracing_enabled()


def test_off_by_default(handles: list[TracingHandle]) -> None:
    handle = configure_tracing("asap-scheduler", {})
    handles.append(handle)
    assert not handle.enabled and not setup.tracing_enabled()
    tracer = get_tracer()
    with tracer.start_as_current_span(spans.SCHEDULER_REQUEST) as span:
        span.set_attribute(spans.REQUEST_ID, "r")
        assert not span.is_recording()
        assert spans.inject() == ("", "")  # nothing was attached to the context
    assert tracer.start_span("x") is tracer.start_span("y")  # one shared inert span, no allocation


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console", "ASAP_TRACE_FILE": "x"},
    ],
)
def test_none_and_disabled_stay_off(env: dict[str, str]) -> None:
    assert build_exporters(env) == []


def test_exporter_choice() -> None:
    def kinds(env: dict[str, str]) -> list[tuple[str, type]]:
        made = build_exporters(env)
        for _, exporter in made:
            exporter.shutdown()
        return [(name, type(exporter)) for name, exporter in made]

    assert kinds({"OTEL_TRACES_EXPORTER": "console"}) == [("console", ConsoleSpanExporter)]
    # An endpoint alone means OTLP; nothing connects until spans are exported.
    assert kinds({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) == [("otlp/grpc", GrpcExporter)]
    env = {"OTEL_TRACES_EXPORTER": "otlp, console", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert kinds(env) == [("otlp/http/protobuf", HttpExporter), ("console", ConsoleSpanExporter)]
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    assert kinds({**env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) == [("otlp/grpc", GrpcExporter)]


def test_http_endpoint_gets_the_signal_path() -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    [(_, exporter)] = build_exporters({**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert exporter._endpoint == "http://collector:4318/v1/traces"  # type: ignore[attr-defined]
    exporter.shutdown()


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/json"),
    ],
)
def test_unknown_values_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        build_exporters(env)


def test_file_exporter_writes_traces_data_lines(tmp_path: Path, handles: list[TracingHandle]) -> None:
    path = tmp_path / "spans.jsonl"
    handle = configure_tracing("asap-attention-3", {"ASAP_TRACE_FILE": str(path)})
    handles.append(handle)
    assert handle.enabled and setup.tracing_enabled() and handle.exporters == [f"file:{path}"]
    with get_tracer().start_as_current_span(spans.ATTENTION_LAYER, attributes={spans.LAYER: 2}) as span:
        trace_id = span.get_span_context().trace_id
    handle.shutdown()
    handle.shutdown()  # twice is fine
    assert not setup.tracing_enabled()
    [line] = path.read_text(encoding="utf-8").splitlines()
    data = json.loads(line)
    raw_span = data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert raw_span["traceId"] == f"{trace_id:032x}"  # hex, as OTLP/JSON wants
    assert isinstance(raw_span["startTimeUnixNano"], str) and raw_span["kind"] == 1
    message = json_format.ParseDict(data, TracesData(), ignore_unknown_fields=False)
    resource = message.resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "asap-attention-3"
    assert message.resource_spans[0].scope_spans[0].spans[0].name == spans.ATTENTION_LAYER


def test_file_exporter_appends_from_several_writers(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    exporters = [JsonLinesSpanExporter(path), JsonLinesSpanExporter(path)]
    tracers = []
    for service, exporter in zip(("asap-expert-0", "asap-expert-1"), exporters, strict=True):
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracers.append(provider.get_tracer("test"))
    for i in range(10):
        with tracers[i % 2].start_as_current_span(spans.EXPERT_COMPUTE):
            pass
    records = load_spans(path)
    assert len(records) == 10
    assert [r.service for r in records] == ["asap-expert-0", "asap-expert-1"] * 5
    exporters[0].shutdown()
    assert exporters[0].export([]) is SpanExportResult.SUCCESS
    with tracers[0].start_as_current_span("after shutdown"):
        pass
    assert len(load_spans(path)) == 10
    exporters[1].shutdown()


WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as on an image without OpenTelemetry
from asap.telemetry import configure_tracing, get_tracer, spans, tracing_enabled
handle = configure_tracing("asap-expert-0", {"ASAP_TRACE_FILE": sys.argv[1]})
with get_tracer().start_as_current_span(spans.EXPERT_COMPUTE) as span:
    span.set_attribute(spans.LAYER, 1)
    assert not span.is_recording()
with get_tracer().start_span(spans.EXPERT_QUEUE) as span:
    span.end()
handle.shutdown()
assert not handle.enabled and not tracing_enabled()
assert spans.inject() == ("", "") and spans.link_from("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is None
print("ok")
"""


def test_everything_is_inert_without_opentelemetry(tmp_path: Path) -> None:
    path = tmp_path / "never.jsonl"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL, str(path)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
    assert not path.exists()
