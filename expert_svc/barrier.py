"""The sync-mode barrier of an expert rank (the DP+EP baseline). No grpc here.

In sync mode every attention rank sends every expert rank its dispatch of each layer of a global step,
possibly empty. The expert rank computes a (step, layer) only after the dispatches of all participating
attention ranks are complete, as an all-to-all forces; this module holds chunks until then. A participant
that never arrives fails the waiting chunks after ``timeout_s`` instead of hanging the step forever.

With ``supersede`` (the expert service's setting): the scheduler runs one step at a time, so the first chunk of a newer step means every older step is over:
finished, or given up because a participant left it (killed, frozen, its batch failed). Groups of older
steps still open then can never complete, and are failed at once with ``Unavailable``, which releases the
attention ranks held in them within one step of the loss, not after ``timeout_s``.
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
    error: Unavailable | None = None
    """Set when the group is given up (a newer step superseded it)."""


class StepBarrier:
    """Holds dispatch chunks per (step, layer) until every participant's dispatch has fully arrived."""

    def __init__(self, timeout_s: float = 120.0, *, supersede: bool = False) -> None:
        self.timeout_s = timeout_s
        self.supersede = supersede
        """Fail older steps' open groups when a newer step begins (the expert service turns it on: its
        scheduler runs one step at a time); off, steps are independent keys."""
        self._groups: dict[tuple[int, int], _Group] = {}
        self._latest_step = 0
        self.superseded = 0
        """Groups failed because a newer step began (a participant had left theirs)."""

    @property
    def open_groups(self) -> int:
        return len(self._groups)

    async def wait(
        self, *, sync: SyncStep, layer: int, attention_rank: int, rows: int, total_rows: int
    ) -> int:
        """Register one chunk and wait for the rest of its (step, layer); returns nanoseconds waited."""
        step, participants = sync.step, sync.participants
        if self.supersede and step > self._latest_step:
            self._supersede(step)
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
        if group.error is not None:
            raise group.error
        return clock.monotonic_ns() - started

    def _supersede(self, step: int) -> None:
        """``step`` began: fail the open groups of older steps (their step was given up)."""
        self._latest_step = step
        for key in [k for k in self._groups if k[0] < step]:
            group = self._groups.pop(key)
            missing = group.participants - len(group.complete)
            group.error = Unavailable(
                f"sync step {key[0]} layer {key[1]}: given up by the scheduler ({missing} attention rank(s) "
                f"left it); step {step} began"
            )
            group.released.set()
            self.superseded += 1
