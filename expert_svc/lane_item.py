"""One dispatch an expert-side link end took off its ring, as the lane's compute thread gets it (views of
its slot's rows, ids and weights, and when it was taken), and the spans recorded for it once answered.

Why its own module: every link end (CPU fast, GPU fast, NIXL) builds these and every lane computes them;
spans are made after the completion is out, off the hot path (DESIGN.md §9, "Observability stays").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asap.dataplane.fastlink import Request, SlotHeader
from asap.telemetry import spans
from expert_svc.lane_end import LaneEnd

__all__ = ["LaneItem", "record_spans"]


@dataclass(slots=True, eq=False)
class LaneItem:
    """One dispatch taken from a link end, for the lane's compute thread (what every link end builds)."""

    end: LaneEnd
    request: Request
    header: SlotHeader
    layer: int
    hidden: torch.Tensor  # [n, H] a view of the slot's rows (meta with emulated compute)
    expert_ids: torch.Tensor  # [n, K] int32
    weights: torch.Tensor  # [n, K] float32
    picked_unix_ns: int
    picked_ns: int


def record_spans(item: LaneItem, started_unix: int, compute_ns: int, sent_ns: int) -> None:
    """The expert side's spans of one answered dispatch (queue, compute, send), after the fact, from the
    times taken on the hot path."""
    parent = spans.extract(item.header.traceparent, item.header.tracestate)
    if parent is None:
        return
    r = item.request
    base = {spans.LAYER: r.layer, spans.MICRO_BATCH: r.micro_batch, spans.TOKENS: r.rows}
    transfer = {
        spans.TRANSFER_NS: item.picked_unix_ns - r.sent_unix_ns,
        spans.ATTENTION_RANK: r.attention_rank,
    }
    spans.record(spans.EXPERT_QUEUE, parent, item.picked_unix_ns, started_unix, {**base, **transfer})
    spans.record(spans.EXPERT_COMPUTE, parent, started_unix, started_unix + compute_ns, base)
    spans.record(spans.EXPERT_COMBINE_SEND, parent, started_unix + compute_ns, sent_ns, base)
