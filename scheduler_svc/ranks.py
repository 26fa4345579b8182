"""Per-rank bookkeeping of the scheduler core and the ``RankClient`` it runs batches through."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from asap.errors import AsapError
from scheduler_svc.policy import RankView
from scheduler_svc.requests import RankResultItem, RankSnapshot, ScheduledRequest


class RankClient(Protocol):
    """Runs batches on attention ranks (implemented by the grpc glue over ``Attention.Run``)."""

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        step: int = 0,
        participants: int = 0,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> Sequence[RankResultItem | AsapError | None]:
        """One result or error per request, in request order. Raises ``Unavailable`` if the rank is down.

        Sync modes: ``step``/``participants`` make it one rank's batch of a global step (it may be empty);
        ``chunks`` gives the token range of each request in this batch (chunked prefill; ``None`` in the
        result marks a chunk with more to come); ``drop`` names abandoned chunked requests whose cached
        K/V the rank should free.

        Cancelled when the scheduler gives up on the batch (rank marked down, shutdown)."""
        ...


@dataclass(slots=True, eq=False)
class RankBatch:
    """A batch placed on a rank: queued until ``sent`` is set, then running until its results arrive."""

    batch_id: int
    rank: int
    requests: list[ScheduledRequest]
    predicted_ms: float
    sent: float | None = None
    """``time.monotonic()`` when it went to the rank."""
    task: asyncio.Task[None] | None = None

    @property
    def tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)


@dataclass(slots=True)
class RankState:
    """What the scheduler knows of one attention rank."""

    healthy: bool = True
    down_reason: str = ""
    batches: dict[int, RankBatch] = field(default_factory=dict)
    """Batches placed on the rank and not finished, by batch id."""

    def remaining_ms(self, now: float) -> float:
        """Predicted work left: each batch's cost minus its elapsed time since sent, never negative.

        Batches in flight share the rank, so each one's elapsed time counts against its own cost only.
        """
        return sum(
            max(0.0, b.predicted_ms - (now - b.sent if b.sent is not None else 0.0))
            for b in self.batches.values()
        )

    def view(self, max_inflight: int, now: float, solo_tokens: int | None = None) -> RankView:
        """The rank as a batch policy sees it."""
        free = max_inflight - len(self.batches)
        if solo_tokens is not None and any(b.tokens > solo_tokens for b in self.batches.values()):
            free = 0  # a batch too long to interleave runs alone
        return RankView(self.healthy, free, self.remaining_ms(now), idle=not self.batches)

    def snapshot(self, rank: int, now: float) -> RankSnapshot:
        """The rank as ``SchedulerCore.state`` reports it."""
        queued = [r for b in self.batches.values() if b.sent is None for r in b.requests]
        running = [r for b in self.batches.values() if b.sent is not None for r in b.requests]
        return RankSnapshot(
            rank=rank,
            healthy=self.healthy,
            down_reason=self.down_reason,
            queued_requests=len(queued),
            queued_tokens=sum(r.prompt_tokens for r in queued),
            running_batches=sum(1 for b in self.batches.values() if b.sent is not None),
            running_requests=len(running),
            running_tokens=sum(r.prompt_tokens for r in running),
            predicted_load_ms=self.remaining_ms(now),
        )
