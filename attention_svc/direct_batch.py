"""One async batch on the attention hot path (``attention_svc.direct_runner``): its generator, its links,
what it has posted, and the early results whose verdicts are still to come. No grpc here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from asap.dataplane.direct import DirectLink, Ticket
from asap.errors import AsapError
from asap.model.attention_part import MoERequest
from asap.model.placement import RankDispatch

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span

__all__ = ["DirectBatch", "Step", "confirmed", "waiting_links"]

Step = tuple[MoERequest, list[RankDispatch]]


@dataclass(slots=True, eq=False)
class DirectBatch:
    """One batch on the hot path: its generator, its links and what it has posted."""

    micro_batch: int
    gen: Generator[MoERequest, torch.Tensor, torch.Tensor]
    links: Sequence[DirectLink]
    """One per expert rank, in rank order."""
    finish: Callable[[torch.Tensor], Any]
    """On the compute thread, with the logits: sampling; its result is the batch's result. It must not refer
    to the batch (a batch reachable from itself lives until a full garbage collection)."""
    trace: Context | None = None
    expert_wait_ns: int = 0
    future: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    step: Step | None = None
    tickets: list[Ticket] = field(default_factory=list)
    records: list[tuple[str, int, int, dict[str, Any]]] = field(default_factory=list)
    """Spans to record after the batch: (name, start, end, attributes), ``time.time_ns``."""
    dispatch_spans: list[tuple[Span, list[int]]] = field(default_factory=list)
    last_start_ns: int = 0
    posted_unix_ns: int = 0
    unconfirmed: list[tuple[DirectLink, Ticket]] = field(default_factory=list)
    """Tickets of the last combined layer settled early (``Ticket.settle_early``) whose verdict is still
    to come, with their links (watched while the batch waits)."""
    held: Any = None
    """The next step (a ``Step``, or the logits) computed but held until every ``unconfirmed`` verdict
    came: its dispatches are not posted, nor the batch finished, before that."""

    def ready(self) -> bool:
        """Whether the scheduler can move this batch on: nothing posted yet, every result in (and every
        early result's verdict, for a held step), or a failure among them."""
        if any(t.failure is not None for _, t in self.unconfirmed):
            return True
        if self.held is not None:
            return all(t.confirmed for _, t in self.unconfirmed)
        tickets = self.tickets
        if any(t.done and isinstance(t.outcome, AsapError) for t in tickets):
            return True
        return all(t.done for t in tickets) and self.due_in_ns() <= 0

    def due_in_ns(self) -> int:
        """How long until the last of its settled results may be used (emulated transfers)."""
        latest = max((t.not_before_ns for t in self.tickets), default=0)
        return latest - time.monotonic_ns() if latest else 0


def waiting_links(batch: DirectBatch) -> list[DirectLink]:
    """The links of ``batch``'s unsettled dispatches and of its early results still without a verdict."""
    verdicts = [link for link, ticket in batch.unconfirmed if ticket.verdict_pending]
    if batch.step is None:
        return verdicts
    dispatches = batch.step[1]
    return verdicts + [
        batch.links[dispatches[i].rank]
        for i, ticket in enumerate(batch.tickets)
        if not ticket.done and i < len(dispatches)
    ]


def confirmed(batch: DirectBatch) -> bool:
    """Whether every early result ``batch`` combined has its verdict (then forgotten); the first failed
    verdict is raised (the batch computed on a result that is not one)."""
    for _, ticket in batch.unconfirmed:
        if ticket.failure is not None:
            raise ticket.failure
    if not all(t.confirmed for _, t in batch.unconfirmed):
        return False
    batch.unconfirmed = []
    return True
