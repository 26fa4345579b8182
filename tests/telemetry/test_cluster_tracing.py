"""Tracing a real local cluster end to end: ``LocalCluster`` with ``trace=FILE`` (the in-process
collector), requests from the SDK, then the trace file read back and summarised."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from asap.client import AsapClient, PrefillResult
from asap.cluster import ClusterSpec, LocalCluster
from asap.telemetry import configure_tracing, spans
from asap.telemetry.otlpjson import SpanRecord, load_spans
from asap.telemetry.summary import PARTS, requests_with_spans, summarize

pytestmark = pytest.mark.slow

# Every hop of a request's prefill in async mode, per the contract in asap.telemetry.spans.
HOPS = {
    spans.SCHEDULER_REQUEST,
    spans.SCHEDULER_QUEUE,
    spans.SCHEDULER_BATCH,
    spans.ATTENTION_BATCH,
    spans.ATTENTION_LAYER,
    spans.ATTENTION_DISPATCH,
    spans.ATTENTION_COMBINE_WAIT,
    spans.ATTENTION_SAMPLE,
    spans.EXPERT_QUEUE,
    spans.EXPERT_COMPUTE,
    spans.EXPERT_COMBINE_SEND,
}
EXPERT_SPANS = {spans.EXPERT_QUEUE, spans.EXPERT_COMPUTE, spans.EXPERT_COMBINE_SEND, spans.SYNC_BARRIER_WAIT}
LENGTHS = [5, 17, 40, 64, 9, 120, 33, 80, 3, 50]


def _spec(model: Path, trace: Path, **kwargs: object) -> ClusterSpec:
    return ClusterSpec(
        model=str(model), attention=2, experts=2, port=0, threads=1, trace=str(trace), **kwargs
    )  # type: ignore[arg-type]


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    try:
        yield out
    except BaseException:
        print(out.getvalue()[-5000:])
        raise


async def _send(address: str, lengths: list[int], traced_client: int) -> list[PrefillResult]:
    """``traced_client`` requests one by one through ``prefill`` (each under a client span, as many in
    parallel), the rest over one ``prefill_many`` stream (no client span: the scheduler roots them)."""
    async with AsapClient(address, timeout_s=60) as client:
        singles = [
            client.prefill(tokens=[(7 * i + j) % 200 + 1 for j in range(n)], request_id=f"p{i}")
            for i, n in enumerate(lengths[:traced_client])
        ]
        streamed = client.prefill_many(
            {"tokens": [(3 * i + j) % 200 + 1 for j in range(n)], "request_id": f"s{i}"}
            for i, n in enumerate(lengths[traced_client:])
        )
        *firsts, rest = await asyncio.gather(*singles, streamed)
        return [*firsts, *rest]


def _run(spec: ClusterSpec, log: io.StringIO, lengths: list[int], traced_client: int) -> list[PrefillResult]:
    cluster = LocalCluster(spec, out=log, start_timeout_s=120)
    try:
        address = cluster.start()
        assert cluster.trace_endpoint is not None
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": cluster.trace_endpoint}
        client_tracing = configure_tracing("asap-test-client", env)
        try:
            results = asyncio.run(_send(address, lengths, traced_client))
        finally:
            client_tracing.shutdown()
    finally:
        cluster.stop()  # the children flush on SIGTERM, then the collector closes the file
    return results


def test_each_request_is_one_trace_across_services(qwen3_dir: Path, tmp_path: Path, log: io.StringIO) -> None:
    trace_file = tmp_path / "traces.jsonl"
    results = _run(_spec(qwen3_dir, trace_file), log, LENGTHS, traced_client=6)
    assert len(results) == len(LENGTHS)
    records = load_spans(trace_file)
    by_id = {s.span_id: s for s in records}
    per_request = {
        str(root.attributes[spans.REQUEST_ID]): (root, found) for root, found in requests_with_spans(records)
    }
    assert set(per_request) == {r.request_id for r in results}
    client_spans = {str(s.attributes[spans.REQUEST_ID]): s for s in records if s.name == spans.CLIENT_PREFILL}
    assert set(client_spans) == {f"p{i}" for i in range(6)}

    for result in results:
        root, found = per_request[result.request_id]
        # The response names the request's trace; a traced client's span is the request span's parent.
        assert result.trace_id == root.trace_id
        assert root.attributes[spans.MODE] == "async"
        assert root.attributes[spans.TOKENS] == result.prompt_tokens
        if result.request_id in client_spans:
            client = client_spans[result.request_id]
            assert root.parent_span_id == client.span_id and client.trace_id == root.trace_id
        else:
            assert root.parent_span_id == ""
        names = {s.name for s in found}
        assert names >= HOPS, f"{result.request_id} lacks {HOPS - names}"
        assert spans.SYNC_BARRIER_WAIT not in names
        services = {s.service for s in found}
        assert {"asap-scheduler", f"asap-attention-{result.attention_rank}"} <= services
        assert any(s.startswith("asap-expert-") for s in services)
        assert not any(
            s.startswith("asap-attention-") and s != f"asap-attention-{result.attention_rank}"
            for s in services
        )
        _check_structure(root, found, by_id)

    summary = summarize(records)
    assert len(summary.requests) == len(LENGTHS)
    client_ttft = {r.request_id: r.ttft_ms for r in results}
    report = []
    for breakdown in summary.requests:
        parts = sum(breakdown.parts_ms[p] for p in PARTS)
        measured = client_ttft[breakdown.request_id]
        report.append(
            (breakdown.request_id, round(breakdown.ttft_ms, 3), round(parts, 3), round(measured, 3))
        )
        assert parts == pytest.approx(breakdown.ttft_ms, rel=0.05)
        assert breakdown.ttft_ms == pytest.approx(measured, rel=0.05)
        assert breakdown.parts_ms["attention"] > 0 and breakdown.expert_wait_ms > 0
        assert breakdown.parts_ms["barrier"] == 0
    print("request, span ttft ms, sum of parts ms, reported ttft ms:", json.dumps(report))


def _check_structure(root: SpanRecord, found: list[SpanRecord], by_id: dict[str, SpanRecord]) -> None:
    """Parents and links as the contract draws them."""
    queue = [s for s in found if s.name == spans.SCHEDULER_QUEUE]
    assert len(queue) == 1 and queue[0].parent_span_id == root.span_id
    for span in found:
        parent = by_id.get(span.parent_span_id)
        if span.name == spans.SCHEDULER_BATCH:
            assert span.parent_span_id == "" and root.trace_id in {link.trace_id for link in span.links}
        elif span.name == spans.ATTENTION_BATCH:
            assert parent is not None and parent.name == spans.SCHEDULER_BATCH
            assert root.span_id in {link.span_id for link in span.links}
        elif span.name in {
            spans.ATTENTION_LAYER,
            spans.ATTENTION_DISPATCH,
            spans.ATTENTION_COMBINE_WAIT,
            spans.ATTENTION_SAMPLE,
        }:
            assert parent is not None and parent.name == spans.ATTENTION_BATCH
            assert span.service == parent.service
        elif span.name in EXPERT_SPANS:
            # Context carried in the chunk: the expert rank's spans are children of the dispatch to it.
            assert parent is not None and parent.name == spans.ATTENTION_DISPATCH
            assert span.service == f"asap-expert-{parent.attributes[spans.EXPERT_RANK]}"
            assert span.trace_id == parent.trace_id
            if span.name == spans.EXPERT_QUEUE:
                assert span.int_attr(spans.TRANSFER_NS) is not None
                assert span.attributes[spans.ATTENTION_RANK] == int(
                    by_id[parent.parent_span_id].attributes[spans.RANK]
                )  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def emulated_model(tmp_path_factory: pytest.TempPathFactory, qwen3_dir: Path) -> Path:
    """A config.json alone: emulated compute needs no weights."""
    model = tmp_path_factory.mktemp("emulated") / "qwen3-config"
    model.mkdir()
    shutil.copy(qwen3_dir / "config.json", model / "config.json")
    return model


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_barrier_wait_shows_in_sync_mode_only(
    mode: str, emulated_model: Path, tmp_path: Path, log: io.StringIO
) -> None:
    trace_file = tmp_path / f"{mode}.jsonl"
    lengths = [16, 900, 48, 1500, 200, 700, 32, 1200]
    spec = _spec(emulated_model, trace_file, compute="emulated:h200", mode=mode)
    results = _run(spec, log, lengths, traced_client=len(lengths))
    assert len(results) == len(lengths)
    summary = summarize(load_spans(trace_file))
    assert len(summary.requests) == len(lengths)
    totals = summary.modes[mode]["mean_ms"]
    print(mode, json.dumps(summary.modes[mode]))
    for breakdown in summary.requests:
        assert sum(breakdown.parts_ms[p] for p in PARTS) == pytest.approx(breakdown.ttft_ms, rel=0.05)
    if mode == "sync":
        assert totals["barrier"] > 0
        assert sum(r.parts_ms["barrier"] > 0 for r in summary.requests) >= len(lengths) // 2
    else:
        assert totals["barrier"] == 0
        assert totals["expert_compute"] > 0


def test_an_http_request_joins_the_callers_trace(qwen3_dir: Path, tmp_path: Path, log: io.StringIO) -> None:
    """The OpenAI front door honours ``traceparent`` as gRPC honours the in-message context: the
    scheduler's request span is the caller's span's child, and every hop follows in that trace."""
    import urllib.request

    trace_file = tmp_path / "traces.jsonl"
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    cluster = LocalCluster(
        ClusterSpec(model=str(qwen3_dir), attention=1, experts=1, port=0, threads=1, trace=str(trace_file),
                    http_port=0),
        out=log,
    )  # fmt: skip
    try:
        cluster.start()
        body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 1, "request_id": "h1"}).encode()
        request = urllib.request.Request(
            f"{cluster.http_url}/v1/completions",
            data=body,
            headers={
                "Content-Type": "application/json",
                "traceparent": f"00-{caller_trace}-{caller_span}-01",
            },
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        cluster.stop()
    assert answer["asap"]["trace_id"] == caller_trace
    records = load_spans(trace_file)
    (root,) = [s for s in records if s.name == spans.SCHEDULER_REQUEST]
    assert root.trace_id == caller_trace and root.parent_span_id == caller_span
    assert root.attributes[spans.REQUEST_ID] == "h1"
    ((_, found),) = list(requests_with_spans(records))
    assert {s.name for s in found} >= HOPS
