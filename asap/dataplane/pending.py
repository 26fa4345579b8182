"""A dispatch that awaits its answer on an attention end, and who waits for it: a coroutine (its
future, settled on the event loop) or a hot-path compute thread (its ``Ticket``,
``asap.dataplane.direct``, settled on whichever thread takes the answer).

An abandoned dispatch (its exchange gave up) stays pending until its answer arrives, because its peer may
still write its slot (the quarantine rule of ``asap.dataplane.link``); nobody is woken for it then.

Both attention ends that publish into slots (the CPU fast plane's ``asap.dataplane.fast_attention`` and
the NIXL plane's ``asap.dataplane.nixl_attention``) build a dispatch's slot header, its ``Request``
descriptor and its sink here, so the two wires cannot drift apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.fastlink import Request, SlotHeader
from asap.errors import AsapError

__all__ = [
    "Outcome",
    "PendingDispatch",
    "Sink",
    "dispatch_header",
    "dispatch_request",
    "fail_pending",
    "settle_future",
    "sink_for",
]

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
            if (not sink.done or sink.verdict_pending) and not entry.abandoned:
                sink.settle(error)
                failed += 1
        elif not sink.done():
            sink.set_exception(error)
            failed += 1
    return failed


def sink_for(
    loop: asyncio.AbstractEventLoop, ticket: Ticket | None
) -> tuple[asyncio.Future[torch.Tensor] | None, Sink]:
    """Who will wait for a dispatch about to be published: ``ticket`` (a hot-path sender) or a fresh
    future on ``loop`` (a coroutine); the future is returned too (None for a ticket)."""
    if ticket is not None:
        return None, ticket
    future: asyncio.Future[torch.Tensor] = loop.create_future()
    return future, future


def dispatch_header(
    micro_batch: int, seq: int, layer: int, rows: int, traceparent: str, tracestate: str
) -> SlotHeader:
    """The slot header of dispatch ``seq``, stamped now (the expert's spans start from it)."""
    return SlotHeader(micro_batch, seq, layer, rows, time.time_ns(), traceparent, tracestate)


def dispatch_request(
    *,
    slot: int,
    seq: int,
    micro_batch: int,
    layer: int,
    rows: int,
    attention_rank: int,
    flags: int = 0,
    not_before_ns: int = 0,
) -> Request:
    """The descriptor that publishes dispatch ``seq`` in ``slot``, stamped now."""
    return Request(
        micro_batch=micro_batch,
        layer=layer,
        slot=slot,
        rows=rows,
        flags=flags,
        seq=seq,
        sent_unix_ns=time.time_ns(),
        not_before_ns=not_before_ns,
        attention_rank=attention_rank,
    )
