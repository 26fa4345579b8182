"""Chrome trace-event output checked against the format's rules, and the PNG timeline."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from asap.cli import main
from asap.telemetry.otlpjson import load_spans
from asap.telemetry.perfetto import parse_window, to_trace_events
from tests.telemetry.synth import TraceBuilder, async_batch, sync_batch

# Required keys and their types per phase, after the Trace Event Format document (pid/tid ints,
# ts/dur microseconds as numbers, async ids as strings shared by a "b" and its "e").
_NUMBER = (int, float)
SCHEMA: dict[str, dict[str, Any]] = {
    "X": {"name": str, "cat": str, "pid": int, "tid": int, "ts": _NUMBER, "dur": _NUMBER},
    "b": {"name": str, "cat": str, "pid": int, "tid": int, "ts": _NUMBER, "id": str},
    "e": {"name": str, "cat": str, "pid": int, "tid": int, "ts": _NUMBER, "id": str},
    "M": {"name": str, "pid": int, "tid": int, "args": dict},
}
METADATA_NAMES = {"process_name", "thread_name", "process_sort_index", "thread_sort_index"}


def check_trace_events(document: Any) -> list[dict[str, Any]]:
    """Raise AssertionError where ``document`` breaks the trace-event format; return its events."""
    assert isinstance(document, dict) and isinstance(document["traceEvents"], list)
    assert document.get("displayTimeUnit") in ("ms", "ns")
    open_async: dict[tuple[str, str, int], float] = {}
    for event in document["traceEvents"]:
        phase = event.get("ph")
        assert phase in SCHEMA, event
        for key, kind in SCHEMA[phase].items():
            assert isinstance(event.get(key), kind) and not isinstance(event.get(key), bool), (key, event)
        if phase == "X":
            assert event["dur"] >= 0 and event["ts"] >= 0
        elif phase == "M":
            assert event["name"] in METADATA_NAMES
        elif phase == "b":
            open_async[(event["cat"], event["id"], event["pid"])] = event["ts"]
        else:
            start = open_async.pop((event["cat"], event["id"], event["pid"]))
            assert event["ts"] >= start
        if "args" in event:
            assert isinstance(event["args"], dict)
    assert not open_async, "async begin events without an end"
    return list(document["traceEvents"])


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    builder = TraceBuilder()
    async_batch(builder)
    sync_batch(builder, offset=120.0)
    return builder.write(tmp_path / "trace.jsonl")


def test_processes_tracks_and_async_where_spans_overlap(trace_file: Path) -> None:
    events = check_trace_events(to_trace_events(load_spans(trace_file)))
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert list(processes.values()) == [
        "asap-scheduler",
        "asap-attention-0",
        "asap-expert-0",
        "asap-expert-1",
    ]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    phases: dict[str, set[str]] = defaultdict(set)
    for event in events:
        if event["ph"] != "M":
            phases[f"{processes[event['pid']]}/{threads[(event['pid'], event['tid'])]}"].add(event["ph"])
    # The two dispatches of layer 0 overlap in time; the requests overlap; layers do not.
    assert phases["asap-attention-0/attention.dispatch"] == {"b", "e"}
    assert phases["asap-scheduler/scheduler.request"] == {"b", "e"}
    assert phases["asap-attention-0/attention.layer"] == {"X"}
    assert phases["asap-expert-0/sync.barrier_wait"] == {"X"}
    first = min(e["ts"] for e in events if e["ph"] in ("X", "b"))
    assert first == 0.0
    layer = next(e for e in events if e["ph"] == "X" and e["name"] == "attention.layer")
    assert (layer["ts"], layer["dur"], layer["args"]["asap.layer"]) == (12000.0, 18000.0, 0)


def test_cli_writes_json_and_png(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "trace.json", tmp_path / "timeline.png"
    argv = ["trace", "perfetto", str(trace_file), str(out), "--png", str(png), "--window", "0,130"]
    assert main(argv) == 0
    check_trace_events(json.loads(out.read_text(encoding="utf-8")))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    printed = capsys.readouterr().out
    assert "spans drawn" in printed
    assert int(printed.split("wrote ")[-1].split(": ")[1].split()[0]) > 0


def test_window_is_validated(trace_file: Path, tmp_path: Path) -> None:
    assert parse_window("1.5,20") == (1.5, 20.0)
    for bad in ("20,10", "x", "1,2,3", "-1,5"):
        with pytest.raises(ValueError):
            parse_window(bad)
    assert main(["trace", "perfetto", str(trace_file), str(tmp_path / "o.json"), "--window", "0,1"]) == 2
