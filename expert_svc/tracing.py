"""Expert-side spans of one dispatch chunk (queue, compute, combine send, sync barrier)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from asap.telemetry import spans
from asap.wire import chunks
from expert_svc.core import ExpertResult

if TYPE_CHECKING:
    from opentelemetry.context import Context


class ChunkTrace:
    """The expert-side spans of one chunk, children of the ``attention.dispatch`` context it carries.

    Times are taken as the chunk moves (``time.time_ns``) and the executor's own queue/compute figures;
    the spans are recorded once its combine chunk is sent, so nothing is held open across the executor.
    """

    __slots__ = ("arrived_ns", "barrier_ns", "compute", "dispatch", "parent", "queued_ns", "result_ns")

    def __init__(self, parent: Context, dispatch: chunks.Dispatch) -> None:
        self.parent = parent
        self.dispatch = dispatch
        self.arrived_ns = self.queued_ns = time.time_ns()
        self.barrier_ns: tuple[int, int] | None = None
        self.compute: tuple[int, int] | None = None  # queue wait, compute time (ns)
        self.result_ns = 0

    @classmethod
    def start(cls, dispatch: chunks.Dispatch) -> ChunkTrace | None:
        parent = spans.extract(dispatch.traceparent, dispatch.tracestate)
        return None if parent is None else cls(parent, dispatch)

    def barrier_done(self) -> None:
        self.queued_ns = time.time_ns()
        self.barrier_ns = (self.arrived_ns, self.queued_ns)

    def computed(self, result: ExpertResult) -> None:
        self.result_ns = time.time_ns()
        if self.dispatch.rows:
            self.compute = (result.queue_ns, result.compute_ns)

    def sent(self) -> None:
        d = self.dispatch
        base = {spans.LAYER: d.layer, spans.MICRO_BATCH: d.micro_batch, spans.TOKENS: d.rows}
        transfer = {
            spans.ATTENTION_RANK: d.attention_rank,
            spans.TRANSFER_NS: self.arrived_ns - d.sent_unix_nanos,
        }
        if self.barrier_ns is not None:
            spans.record(
                spans.SYNC_BARRIER_WAIT,
                self.parent,
                *self.barrier_ns,
                {**base, **transfer, spans.STEP: d.sync.step if d.sync is not None else 0},
            )
        if self.compute is not None:
            queue_ns, compute_ns = self.compute
            started = self.queued_ns + queue_ns
            spans.record(spans.EXPERT_QUEUE, self.parent, self.queued_ns, started, {**base, **transfer})
            spans.record(spans.EXPERT_COMPUTE, self.parent, started, started + compute_ns, base)
        spans.record(spans.EXPERT_COMBINE_SEND, self.parent, self.result_ns, time.time_ns(), base)
