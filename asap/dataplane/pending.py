"""A dispatch that awaits its answer on an attention end, and who waits for it: a coroutine (its
future, settled on the event loop) or a hot-path compute thread (its ``Ticket``,
``asap.dataplane.direct``, settled on whichever thread takes the answer).

An abandoned dispatch (its exchange gave up) stays pending until its answer arrives, because its peer may
still write its slot (the quarantine rule of ``asap.dataplane.link``); nobody is woken for it then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

import torch

from asap.dataplane.direct import Ticket
from asap.errors import AsapError

__all__ = ["Outcome", "PendingDispatch", "Sink", "fail_pending", "settle_future"]

Outcome = torch.Tensor | AsapError
"""A dispatch's answer: its results, or the error it failed with."""

Sink = Union["asyncio.Future[torch.Tensor]", Ticket]
"""Who waits for a dispatch: a coroutine (its future) or a compute thread (its hot-path ticket)."""


@dataclass(slots=True, eq=False)
class PendingDispatch:
    seq: int
    slot: int
    rows: int
    sink: Sink
    abandoned: bool = False
    """The exchange gave up (cancelled or failed elsewhere): the slot waits for the completion."""


def settle_future(future: asyncio.Future[torch.Tensor], outcome: Outcome) -> None:
    """On the loop: ``outcome`` to a coroutine's ``future``, unless it gave up already."""
    if future.done():
        return
    if isinstance(outcome, AsapError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def fail_pending(entries: Iterable[PendingDispatch], error: AsapError) -> int:
    """On the loop, once the end is broken: every dispatch still waited for fails with ``error``; how
    many there were (abandoned ones and those already answered are left alone)."""
    failed = 0
    for entry in entries:
        sink = entry.sink
        if isinstance(sink, Ticket):
            if not sink.done and not entry.abandoned:
                sink.settle(error)
                failed += 1
        elif not sink.done():
            sink.set_exception(error)
            failed += 1
    return failed
