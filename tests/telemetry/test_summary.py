"""The TTFT breakdown on synthetic traces whose every interval is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asap.cli import main
from asap.telemetry.otlpjson import load_spans
from asap.telemetry.summary import PARTS, summarize
from tests.telemetry.synth import TraceBuilder, async_batch, sync_batch


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    builder = TraceBuilder()
    async_batch(builder)
    sync_batch(builder, offset=200.0)
    return builder.write(tmp_path / "trace.jsonl")


def test_parts_match_the_hand_computed_accounting(trace_file: Path) -> None:
    summary = summarize(load_spans(trace_file))
    by_id = {r.request_id: r for r in summary.requests}
    assert set(by_id) == {"r1", "r2", "s1"}
    # r1: queue 0-10; other 10-12 and 90-100; attention 12-30, 60-85, 85-90; dispatch 30-33; in the
    # wait 33-60: transfer 33-34 and 55-60, expert queue 34-40, expert compute 40-55.
    assert by_id["r1"].ttft_ms == 100.0
    assert by_id["r1"].parts_ms == {
        "queue": 10.0,
        "attention": 48.0,
        "transfer": 9.0,
        "expert_queue": 6.0,
        "expert_compute": 15.0,
        "barrier": 0.0,
        "other": 12.0,
    }
    assert by_id["r1"].expert_wait_ms == 27.0  # the whole combine wait
    # r2 shares the batch but arrived 5 ms later: only its queue differs.
    assert by_id["r2"].ttft_ms == 95.0
    assert by_id["r2"].parts_ms["queue"] == 5.0
    assert {p: by_id["r2"].parts_ms[p] for p in PARTS if p != "queue"} == {
        p: by_id["r1"].parts_ms[p] for p in PARTS if p != "queue"
    }
    assert by_id["r1"].services == ["asap-attention-0", "asap-expert-0", "asap-expert-1", "asap-scheduler"]


def test_parts_sum_to_ttft_and_barrier_only_in_sync(trace_file: Path) -> None:
    summary = summarize(load_spans(trace_file))
    for request in summary.requests:
        assert sum(request.parts_ms.values()) == pytest.approx(request.ttft_ms, abs=1e-6)
    s1 = next(r for r in summary.requests if r.request_id == "s1")
    assert s1.mode == "sync"
    assert s1.parts_ms == {
        "queue": 5.0,
        "attention": 12.0,
        "transfer": 5.0,
        "expert_queue": 2.0,
        "expert_compute": 7.0,
        "barrier": 15.0,
        "other": 4.0,
    }
    assert summary.modes["sync"]["mean_ms"]["barrier"] == 15.0
    assert summary.modes["sync"]["share"]["barrier"] == pytest.approx(0.3)
    assert summary.modes["async"]["mean_ms"]["barrier"] == 0.0
    assert summary.modes["async"]["requests"] == 2
    assert summary.modes["async"]["mean_ttft_ms"] == 97.5


def test_another_batch_never_leaks_into_a_request(tmp_path: Path) -> None:
    builder = TraceBuilder()
    async_batch(builder)
    sync_batch(builder, offset=0.0)  # overlaps r1/r2 in time, on the same ranks
    summary = summarize(load_spans(builder.write(tmp_path / "t.jsonl")))
    r1 = next(r for r in summary.requests if r.request_id == "r1")
    assert r1.parts_ms["barrier"] == 0.0
    assert r1.parts_ms["attention"] == 48.0


def test_per_service_totals(trace_file: Path) -> None:
    services = summarize(load_spans(trace_file)).services
    assert services["asap-expert-1"]["expert.compute"] == {"count": 1, "total_ms": 10.0}
    assert services["asap-attention-0"]["attention.layer"] == {"count": 3, "total_ms": 53.0}
    assert services["asap-expert-0"]["sync.barrier_wait"]["count"] == 1


def test_cli_json_and_table(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "summarize", str(trace_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["request_id"] for r in data["requests"]} == {"r1", "r2", "s1"}
    assert set(data["modes"]) == {"async", "sync"}
    assert main(["trace", "summarize", str(trace_file)]) == 0
    table = capsys.readouterr().out
    assert "per request (ms)" in table and "barrier" in table and "s1" in table


def test_cli_rejects_a_malformed_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": []}\n{"truncated', encoding="utf-8")
    assert main(["trace", "summarize", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["trace", "summarize", str(tmp_path / "missing.jsonl")]) == 2
