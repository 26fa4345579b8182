"""Where did each request's TTFT go? The accounting behind ``asap trace summarize``.

**A request** is a ``scheduler.request`` span S (keyed by its ``asap.request_id``); its measured TTFT is
S's duration. **Its spans** are every span of S's trace, plus every span holding a link into S's trace
(``scheduler.batch``, ``attention.batch``) together with all of that span's descendants by parent id,
in any trace and service (the expert spans are children of ``attention.dispatch`` through the context
carried in each chunk). Only these spans count, so another batch's work never lands in this request.

**The breakdown** partitions the interval [S.start, S.end]: each instant is given to exactly one part by
the first rule that holds among the request's spans active at that instant (clipped to the interval):

1. ``queue``: a ``scheduler.queue`` span is active;
2. ``attention``: an ``attention.layer`` or ``attention.sample`` span is active (attention compute);
3. inside an ``attention.combine_wait`` span (the attention rank waits for expert results) -- the
   **expert wait** -- the instant is:
   a. ``barrier`` when a ``sync.barrier_wait`` span is active (sync mode: an expert rank holds a chunk
      until the other attention ranks' chunks of the step arrive),
   b. else ``expert_compute`` when an ``expert.compute`` span is active,
   c. else ``expert_queue`` when an ``expert.queue`` span is active,
   d. else ``transfer`` (chunks on the wire, encode/decode, combine send and delivery);
4. ``transfer``: an ``attention.dispatch`` span is active (sending chunks to expert ranks);
5. ``other``: none of the above (scheduler -> attention RPC, batch set-up, result delivery...).

The parts therefore sum to the TTFT exactly; ``other`` is the remainder and is reported, not hidden.
``expert_wait = transfer_in_wait + expert_queue + expert_compute`` is reported beside its parts, and
``transfer`` includes dispatch sends outside the wait. Expert ranks run concurrently, so when one rank
computes while another queues, the instant counts as compute (the rule order above). Times from different
hosts are compared directly: keep clocks synchronised for multi-host traces.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from asap.telemetry import spans as names
from asap.telemetry.otlpjson import SpanRecord

PARTS = ("queue", "attention", "transfer", "expert_queue", "expert_compute", "barrier", "other")

# Span name -> interval kind for the sweep.
_KIND = {
    names.SCHEDULER_QUEUE: "queue",
    names.ATTENTION_LAYER: "attention",
    names.ATTENTION_SAMPLE: "attention",
    names.ATTENTION_COMBINE_WAIT: "wait",
    names.SYNC_BARRIER_WAIT: "barrier",
    names.EXPERT_COMPUTE: "expert_compute",
    names.EXPERT_QUEUE: "expert_queue",
    names.ATTENTION_DISPATCH: "dispatch",
}


@dataclass(slots=True)
class RequestBreakdown:
    """TTFT of one request and its parts, in milliseconds (parts sum to ``ttft_ms``)."""

    request_id: str
    trace_id: str
    mode: str
    ttft_ms: float
    parts_ms: dict[str, float]
    expert_wait_ms: float
    span_count: int
    services: list[str]


@dataclass(slots=True)
class TraceSummary:
    """Per request breakdowns, their per-mode aggregates and per-service span totals."""

    requests: list[RequestBreakdown] = field(default_factory=list)
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what ``--json`` prints)."""
        return {
            "requests": [asdict(r) for r in self.requests],
            "modes": self.modes,
            "services": self.services,
        }


def requests_with_spans(records: Iterable[SpanRecord]) -> list[tuple[SpanRecord, list[SpanRecord]]]:
    """Each ``scheduler.request`` span (by start time) with the spans that belong to its request."""
    records = list(records)
    index = _Index.build(records)
    roots = sorted((s for s in records if s.name == names.SCHEDULER_REQUEST), key=lambda s: s.start_ns)
    return [(root, _request_spans(root, index)) for root in roots]


def _request_spans(root: SpanRecord, index: _Index) -> list[SpanRecord]:
    found: dict[str, SpanRecord] = {s.span_id: s for s in index.by_trace.get(root.trace_id, [])}
    # Children share their parent's trace, so only spans outside the root trace need walking.
    stack = list(index.linking.get(root.trace_id, []))
    while stack:
        span = stack.pop()
        if span.span_id in found:
            continue
        found[span.span_id] = span
        stack.extend(index.children.get(span.span_id, []))
    return list(found.values())


@dataclass
class _Index:
    by_trace: dict[str, list[SpanRecord]] = field(default_factory=lambda: defaultdict(list))
    children: dict[str, list[SpanRecord]] = field(default_factory=lambda: defaultdict(list))
    linking: dict[str, list[SpanRecord]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def build(cls, records: Iterable[SpanRecord]) -> _Index:
        index = cls()
        for span in records:
            index.by_trace[span.trace_id].append(span)
            if span.parent_span_id:
                index.children[span.parent_span_id].append(span)
            for trace_id in {link.trace_id for link in span.links}:
                index.linking[trace_id].append(span)
        return index


def _classify(active: dict[str, int]) -> str:
    if active["queue"]:
        return "queue"
    if active["attention"]:
        return "attention"
    if active["wait"]:
        for part in ("barrier", "expert_compute", "expert_queue"):
            if active[part]:
                return part
        return "wait_transfer"
    if active["dispatch"]:
        return "dispatch"
    return "other"


def breakdown(root: SpanRecord, request_spans: Iterable[SpanRecord]) -> dict[str, int]:
    """Nanoseconds of ``root``'s interval per part of :data:`PARTS` (see the module docstring), plus
    ``expert_wait`` (the combine-wait time: its transfer, expert queue and expert compute parts)."""
    lo, hi = root.start_ns, root.end_ns
    events: list[tuple[int, int, str]] = []  # (time, +1/-1, kind)
    for span in request_spans:
        kind = _KIND.get(span.name)
        start, end = max(span.start_ns, lo), min(span.end_ns, hi)
        if kind is None or end <= start:
            continue
        events.append((start, 1, kind))
        events.append((end, -1, kind))
    events.sort(key=lambda e: e[0])
    active = dict.fromkeys(_KIND.values(), 0)
    parts = dict.fromkeys((*PARTS, "wait_transfer", "dispatch"), 0)
    cursor = lo
    for time, delta, kind in events:
        if time > cursor:
            parts[_classify(active)] += time - cursor
            cursor = time
        active[kind] += delta
    parts[_classify(active)] += max(0, hi - cursor)
    wait_transfer, dispatch = parts.pop("wait_transfer"), parts.pop("dispatch")
    parts["transfer"] = wait_transfer + dispatch
    parts["expert_wait"] = wait_transfer + parts["expert_queue"] + parts["expert_compute"]
    return parts


def _ms(ns: float) -> float:
    return round(ns / 1e6, 6)


def summarize(records: Iterable[SpanRecord]) -> TraceSummary:
    """Break down every request found in ``records`` and aggregate per mode and per service."""
    records = list(records)
    summary = TraceSummary()
    for root, spans_of_request in requests_with_spans(records):
        parts = breakdown(root, spans_of_request)
        expert_wait = parts.pop("expert_wait")
        summary.requests.append(
            RequestBreakdown(
                request_id=str(root.attributes.get(names.REQUEST_ID) or root.span_id),
                trace_id=root.trace_id,
                mode=str(root.attributes.get(names.MODE) or "unknown"),
                ttft_ms=_ms(root.duration_ns),
                parts_ms={part: _ms(ns) for part, ns in parts.items()},
                expert_wait_ms=_ms(expert_wait),
                span_count=len(spans_of_request),
                services=sorted({s.service for s in spans_of_request}),
            )
        )
    summary.modes = _per_mode(summary.requests)
    summary.services = _per_service(records)
    return summary


def _per_mode(requests: list[RequestBreakdown]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, list[RequestBreakdown]] = defaultdict(list)
    for request in requests:
        grouped[request.mode].append(request)
    modes: dict[str, dict[str, Any]] = {}
    for mode, group in sorted(grouped.items()):
        total_ttft = sum(r.ttft_ms for r in group)
        totals = {part: sum(r.parts_ms[part] for r in group) for part in PARTS}
        totals["expert_wait"] = sum(r.expert_wait_ms for r in group)
        modes[mode] = {
            "requests": len(group),
            "mean_ttft_ms": round(total_ttft / len(group), 6),
            "mean_ms": {part: round(v / len(group), 6) for part, v in totals.items()},
            "share": {part: round(v / total_ttft, 6) if total_ttft else 0.0 for part, v in totals.items()},
        }
    return modes


def _per_service(records: list[SpanRecord]) -> dict[str, dict[str, dict[str, float]]]:
    services: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for span in records:
        entry = services[span.service].setdefault(span.name, {"count": 0, "total_ms": 0.0})
        entry["count"] += 1
        entry["total_ms"] += span.duration_ns / 1e6
    return {
        service: {
            name: {"count": e["count"], "total_ms": round(e["total_ms"], 6)} for name, e in sorted(by.items())
        }
        for service, by in sorted(services.items())
    }


_COLUMNS = ("ttft", *PARTS, "expert_wait")


def format_table(summary: TraceSummary, limit: int | None = None) -> str:
    """Plain-text tables: per request (first ``limit``), per mode, per service."""
    lines = ["per request (ms)", f"{'request':<24} {'mode':<12} " + " ".join(f"{c:>14}" for c in _COLUMNS)]
    for r in summary.requests[:limit]:
        values = [r.ttft_ms, *(r.parts_ms[p] for p in PARTS), r.expert_wait_ms]
        lines.append(f"{r.request_id[:24]:<24} {r.mode[:12]:<12} " + " ".join(f"{v:>14.3f}" for v in values))
    if limit is not None and len(summary.requests) > limit:
        lines.append(f"... {len(summary.requests) - limit} more (use --json for all)")
    lines += ["", "per mode: mean ms (share of TTFT)"]
    for mode, agg in summary.modes.items():
        cells = [f"ttft {agg['mean_ttft_ms']:.3f}"]
        cells += [f"{p} {agg['mean_ms'][p]:.3f} ({agg['share'][p]:.0%})" for p in (*PARTS, "expert_wait")]
        lines.append(f"{mode} [{agg['requests']} requests]: " + ", ".join(cells))
    lines += ["", "per service: span count / total ms"]
    for service, by_name in summary.services.items():
        cells = [f"{name} {e['count']:.0f}/{e['total_ms']:.3f}" for name, e in by_name.items()]
        lines.append(f"{service}: " + ", ".join(cells))
    return "\n".join(lines)
