"""The sync-mode barrier of an expert rank (the DP+EP baseline). No grpc here.

In sync mode every attention rank sends every expert rank its dispatch of each layer of a global step,
possibly empty. The expert rank computes a (step, layer) only after the dispatches of all participating
attention ranks are complete, as an all-to-all forces; this module holds chunks until then. A participant
that never arrives fails the waiting chunks after ``timeout_s`` instead of hanging the step forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from asap import clock
from asap.errors import InvalidArgument, Unavailable
from asap.syncstep import SyncStep


@dataclass(slots=True)
class _Group:
    participants: int
    released: asyncio.Event = field(default_factory=asyncio.Event)
    received_rows: dict[int, int] = field(default_factory=dict)  # attention rank -> rows received
    complete: set[int] = field(default_factory=set)


class StepBarrier:
    """Holds dispatch chunks per (step, layer) until every participant's dispatch has fully arrived."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self._groups: dict[tuple[int, int], _Group] = {}

    @property
    def open_groups(self) -> int:
        return len(self._groups)

    async def wait(
        self, *, sync: SyncStep, layer: int, attention_rank: int, rows: int, total_rows: int
    ) -> int:
        """Register one chunk and wait for the rest of its (step, layer); returns nanoseconds waited."""
        step, participants = sync.step, sync.participants
        key = (step, layer)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(participants)
        elif group.participants != participants:
            raise InvalidArgument(
                f"step {step} layer {layer}: chunk says {participants} participants, earlier chunks said "
                f"{group.participants}"
            )
        if attention_rank in group.complete:
            raise InvalidArgument(
                f"step {step} layer {layer}: attention rank {attention_rank} sent more rows"
            )
        got = group.received_rows.get(attention_rank, 0) + rows
        group.received_rows[attention_rank] = got
        if got >= total_rows:
            group.complete.add(attention_rank)
            if len(group.complete) == group.participants:
                del self._groups[key]
                group.released.set()
        started = clock.monotonic_ns()
        try:
            await asyncio.wait_for(group.released.wait(), self.timeout_s)
        except TimeoutError:
            self._groups.pop(key, None)
            missing = group.participants - len(group.complete)
            raise Unavailable(
                f"sync step {step} layer {layer}: {missing} attention rank(s) never sent their dispatch "
                f"within {self.timeout_s:.0f}s"
            ) from None
        return clock.monotonic_ns() - started
