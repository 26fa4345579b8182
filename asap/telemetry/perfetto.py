"""Trace files as pictures: Chrome trace-event JSON for Perfetto/chrome://tracing, and a PNG timeline.

Trace-event layout (``{"traceEvents": [...], "displayTimeUnit": "ms"}``):

- one process per service (``pid``; ``process_name`` metadata ``asap-attention-0``...), the scheduler first,
  then attention ranks, then expert ranks;
- one track (``tid``; ``thread_name`` metadata) per span name within the service, so each rank shows
  e.g. ``attention.layer``, ``attention.dispatch`` and ``attention.combine_wait`` as separate streams;
- a track whose spans never overlap uses complete events (``"ph": "X"``); a track with overlapping spans
  (concurrent dispatches, queued chunks) uses async events (``"b"``/``"e"`` pairs sharing an ``id``);
- ``ts``/``dur`` are microseconds since the earliest span of the file; ``args`` holds the span's
  attributes plus ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from asap.telemetry import spans as names
from asap.telemetry.otlpjson import SpanRecord

_NAME_ORDER = {name: i for i, name in enumerate(names.SPAN_NAMES)}


def _service_key(service: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"asap-(scheduler|attention|expert)(?:-(\d+))?", service)
    if match is None:
        return (3, 0, service)
    role = {"scheduler": 0, "attention": 1, "expert": 2}[match.group(1)]
    return (role, int(match.group(2) or 0), service)


def _tracks(records: list[SpanRecord]) -> dict[str, dict[str, list[SpanRecord]]]:
    """service -> span name -> spans sorted by start, services and names in display order."""
    grouped: dict[str, dict[str, list[SpanRecord]]] = defaultdict(lambda: defaultdict(list))
    for span in records:
        grouped[span.service][span.name].append(span)
    return {
        service: {
            name: sorted(grouped[service][name], key=lambda s: (s.start_ns, -s.end_ns))
            for name in sorted(grouped[service], key=lambda n: (_NAME_ORDER.get(n, len(_NAME_ORDER)), n))
        }
        for service in sorted(grouped, key=_service_key)
    }


def _overlaps(track: list[SpanRecord]) -> bool:
    """Whether any two spans of ``track`` (sorted by start) overlap in time."""
    latest_end = None
    for span in track:
        if latest_end is not None and span.start_ns < latest_end:
            return True
        latest_end = span.end_ns if latest_end is None else max(latest_end, span.end_ns)
    return False


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def to_trace_events(records: list[SpanRecord]) -> dict[str, Any]:
    """The Chrome trace-event document for ``records`` (see the module docstring)."""
    events: list[dict[str, Any]] = []
    t0 = min((s.start_ns for s in records), default=0)
    for pid, (service, by_name) in enumerate(_tracks(records).items(), start=1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": service}})
        events.append(
            {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
        )
        for tid, (name, track) in enumerate(by_name.items(), start=1):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
            events.append(
                {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}}
            )
            asynchronous = _overlaps(track)
            for span in track:
                args = {**span.attributes, "trace_id": span.trace_id, "span_id": span.span_id}
                common = {"name": name, "cat": name.split(".")[0], "pid": pid, "tid": tid}
                if asynchronous:
                    span_id = f"0x{span.span_id}"
                    events.append(
                        {**common, "ph": "b", "id": span_id, "ts": _us(span.start_ns - t0), "args": args}
                    )
                    events.append({**common, "ph": "e", "id": span_id, "ts": _us(span.end_ns - t0)})
                else:
                    events.append(
                        {
                            **common,
                            "ph": "X",
                            "ts": _us(span.start_ns - t0),
                            "dur": _us(span.duration_ns),
                            "args": args,
                        }
                    )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"t0_unix_nanos": str(t0)}}


def parse_window(text: str) -> tuple[float, float]:
    """``"START_MS,END_MS"`` -> ``(start, end)``; raises ``ValueError`` unless ``0 <= start < end``."""
    try:
        start, end = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"window must be START_MS,END_MS, got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"window must satisfy 0 <= START_MS < END_MS, got {start},{end}")
    return start, end


def render_png(
    records: list[SpanRecord], out: str | Path, window_ms: tuple[float, float] | None = None
) -> int:
    """Draw a timeline of ``window_ms`` (ms since the earliest span; default: everything) to ``out``.

    One row per service, split into thin lanes per span name; bars colored by span name. Returns the
    number of spans drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min((s.start_ns for s in records), default=0)
    end_all = max(((s.end_ns - t0) / 1e6 for s in records), default=1.0)
    lo, hi = window_ms if window_ms is not None else (0.0, max(end_all, 1e-3))
    tracks = _tracks(records)
    span_names = sorted({s.name for s in records}, key=lambda n: (_NAME_ORDER.get(n, len(_NAME_ORDER)), n))
    cmap = plt.get_cmap("tab20")
    colors = {name: cmap(i % 20) for i, name in enumerate(span_names)}
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.6 * max(1, len(tracks))), dpi=100)
    drawn = 0
    for row, by_name in enumerate(tracks.values()):
        lane_height = 0.8 / max(1, len(by_name))
        for lane, (name, track) in enumerate(by_name.items()):
            bars = [
                ((s.start_ns - t0) / 1e6, max(s.duration_ns / 1e6, 1e-6))
                for s in track
                if (s.end_ns - t0) / 1e6 >= lo and (s.start_ns - t0) / 1e6 <= hi
            ]
            if bars:
                y = row + 0.4 - (lane + 1) * lane_height
                ax.broken_barh(bars, (y, lane_height * 0.9), facecolors=colors[name], linewidth=0)
                drawn += len(bars)
    ax.set_xlim(lo, hi)
    ax.set_ylim(len(tracks) - 0.5, -0.5)
    ax.set_yticks(range(len(tracks)), list(tracks))
    ax.set_xlabel("ms since trace start")
    ax.set_title(f"ASAP trace timeline, {lo:g}-{hi:g} ms")
    ax.legend(
        handles=[Patch(color=colors[n], label=n) for n in span_names],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize="small",
    )
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return drawn
