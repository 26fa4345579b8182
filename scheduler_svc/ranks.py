"""The scheduler's record of the attention ranks (``RankTable``) and the ``RankClient`` it runs batches
through.

``RankTable`` is the one place rank health lives: the core marks a rank down there (its stream broke, its
health check failed) and up again (the health monitor saw it answer), and placement, the sync planner
and the monitor all read it. The client that talks to the ranks keeps no health state of its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from asap.errors import AsapError, InvalidArgument
from asap.syncstep import SyncStep
from scheduler_svc.placement import RankView
from scheduler_svc.requests import RankResultItem, RankSnapshot, ScheduledRequest


class RankClient(Protocol):
    """Runs batches on attention ranks (``attention_client.AttentionClient``, over ``Attention.Run``)."""

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        sync: SyncStep | None = None,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> Sequence[RankResultItem | AsapError | None]:
        """One result or error per request, in request order. Raises ``Unavailable`` if the rank is down.

        Sync modes: ``sync`` makes it one rank's batch of a global step (it may be empty; ``None``: async);
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
    """``asap.clock.monotonic()`` when it went to the rank."""
    task: asyncio.Task[Any] | None = None

    @property
    def tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    def settle_all(self, error: AsapError) -> None:
        """Fail every request of the batch with ``error`` (those whose caller gave up are skipped)."""
        for request in self.requests:
            request.settle(error)


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


class RankTable:
    """Every attention rank's health and the batches placed on it, and the ids of new batches."""

    def __init__(self, num_ranks: int) -> None:
        if num_ranks < 1:
            raise InvalidArgument(f"num_ranks must be >= 1, got {num_ranks}")
        self._states = [RankState() for _ in range(num_ranks)]
        self._batch_ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[RankState]:
        return iter(self._states)

    def __getitem__(self, rank: int) -> RankState:
        if not 0 <= rank < len(self._states):
            raise InvalidArgument(f"attention rank {rank} outside 0..{len(self._states) - 1}")
        return self._states[rank]

    def is_healthy(self, rank: int) -> bool:
        return self[rank].healthy

    def healthy_ranks(self) -> list[int]:
        return [rank for rank, state in enumerate(self._states) if state.healthy]

    def any_healthy(self) -> bool:
        return any(state.healthy for state in self._states)

    def set_down(self, rank: int, reason: str) -> bool:
        """Record ``rank`` as down; ``True`` if it was healthy until now."""
        state = self[rank]
        was_healthy = state.healthy
        state.healthy, state.down_reason = False, reason
        return was_healthy

    def set_up(self, rank: int) -> bool:
        """Record ``rank`` as healthy; ``True`` if it was down until now."""
        state = self[rank]
        was_down = not state.healthy
        state.healthy, state.down_reason = True, ""
        return was_down

    @property
    def busy(self) -> bool:
        """Some batch is placed on a rank and not finished."""
        return any(state.batches for state in self._states)

    def open_batch(self, rank: int, requests: list[ScheduledRequest], predicted_ms: float) -> RankBatch:
        """A new batch with the next batch id, recorded on ``rank`` until ``close_batch``."""
        batch = RankBatch(next(self._batch_ids), rank, requests, predicted_ms)
        self[rank].batches[batch.batch_id] = batch
        return batch

    def close_batch(self, batch: RankBatch) -> None:
        """The batch finished or was given up: it no longer counts on its rank. Idempotent."""
        self[batch.rank].batches.pop(batch.batch_id, None)

    def abort(self, rank: int, error: AsapError) -> None:
        """Fail the requests of every batch on ``rank`` with ``error`` and cancel the batches' tasks."""
        state = self[rank]
        for batch in list(state.batches.values()):
            batch.settle_all(error)
            if batch.task is not None:
                batch.task.cancel()
        state.batches.clear()

    def views(self, max_inflight: int, now: float, solo_tokens: int | None = None) -> list[RankView]:
        """Every rank as placement sees it."""
        return [state.view(max_inflight, now, solo_tokens) for state in self._states]

    def snapshots(self, now: float) -> list[RankSnapshot]:
        return [state.snapshot(rank, now) for rank, state in enumerate(self._states)]
