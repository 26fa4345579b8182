"""The attention rank's end of one NIXL link (DESIGN.md §10; the plane that drives it is
``asap.dataplane.nixl_plane``, the link's memory ``asap.dataplane.nixl_link``): its K slots as credits,
the WRITE of a dispatch with its ``Request`` as the notification, and the ``Completion`` notifications
that follow the expert's WRITE of the results over the rows (copied out before the slot is reused).

Zero-copy on host memory: the dispatch's rows are not copied into the slot; the tensor they already live
in is registered for the WRITE (tens of µs, against a copy of N x 4 KiB on a loaded host) and one WRITE
carries the slot header and the routing (ids, weights: 64 bytes a row, copied into the slot) from the
slot and the rows from the tensor, into the expert's slot in the fast link's layout, with one
notification. GPU slots keep the copy into the slot (registering GPU memory per call pins it). That wire
is ``asap.dataplane.nixl_dispatch``; the slots as credits and the leased results,
``asap.dataplane.nixl_credits``.

Completions are taken by whichever thread polls first: the attention compute thread itself on the hot
path (``asap.dataplane.nixl_direct``: it settles its own tickets, no thread hop), else the process's NIXL
poll thread, which hands the coroutines' answers of one look to the event loop with one wake-up. While a
compute thread polls an end, the poll thread leaves its notifications to it (and only watches its
heartbeat). A missing heartbeat for ``peer_timeout_s`` while dispatches wait fails them all with
``Unavailable``; an abandoned dispatch keeps its slot until its completion arrives or the end is
replaced (the quarantine rule of ``asap.dataplane.link``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import numpy as np
import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.fastlink import SLOT_HEADER_BYTES, Completion, SlotHeader, error_of
from asap.dataplane.fastlink import read_error as read_slot_error
from asap.dataplane.nixl_credits import NixlSlotCredits
from asap.dataplane.nixl_dispatch import (
    COMPLETION_BYTES,
    COMPLETION_TAG,
    completion_notification,
    fill_slot,
    request_notification,
    write_dispatch,
)
from asap.dataplane.nixl_link import HEARTBEAT, NixlEnd, nixl_poller
from asap.dataplane.pending import (
    Outcome,
    PendingDispatch,
    dispatch_header,
    dispatch_request,
    fail_pending,
    settle_future,
    sink_for,
)
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import AsapError, InvalidArgument, Unavailable

__all__ = [
    "NixlAttentionEnd",
    "completion_notification",
    "fill_slot",
    "request_notification",
    "write_dispatch",
]

logger = logging.getLogger(__name__)

_Answer = tuple[PendingDispatch, Outcome, bool]
"""A coroutine's answer taken off the wire: its dispatch, the outcome, whether the result is a lease."""


class NixlAttentionEnd(NixlSlotCredits):
    """One connected NIXL end of a link, attention side (see the module doc; its slots as credits and
    its leased results: ``NixlSlotCredits``)."""

    def __init__(
        self, end: NixlEnd, *, peer: str, dtype: torch.dtype, rank: int, loop: Any, peer_timeout_s: float
    ) -> None:
        slots = end.geometry.slots
        super().__init__(slots, peer=peer, loop=loop, lease_cap=slots // 2 if end.buf is not None else 0)
        self.end = end
        self.peer_timeout_ns = int(peer_timeout_s * 1e9)
        self._heard_ns = time.monotonic_ns()
        """When the peer was last heard from (any notification: completions and its heartbeats)."""
        self.dtype = dtype
        self.rank = rank
        self._pending: dict[int, PendingDispatch] = {}
        self._seq = 0
        self.polled_elsewhere = 0
        """Compute threads taking this end's completions themselves now (the poll thread then leaves
        them to those)."""
        self.expert_ns = 0
        """The expert rank's own time (queue + computation, from the completions) of the answers this
        end took: what a round trip spent beyond the data path."""

    # --- whichever thread polls -------------------------------------------------------------------

    def poll(self, now_ns: int, *, sweeper: bool = True) -> bool:
        """Take arrived notifications (``sweeper``: the process's poll thread, which leaves them to a
        compute thread polling this end itself); whether notifications came (``writing`` says whether
        WRITEs are still in progress)."""
        if sweeper and self.polled_elsewhere:  # that thread moves the WRITEs on: no close polling here
            self._check_peer(now_ns)
            return False
        error = self.end.reap()
        if error:
            self._loop.call_soon_threadsafe(self.fail, Unavailable(f"{self.peer}: {error}"))
        got = self.end.notifications()
        if got:
            self._heard_ns = now_ns
        answers: list[_Answer] = []
        for raw in got:
            answer = self._take(raw)
            if answer is not None:
                answers.append(answer)
        if answers:  # the coroutines' answers of this look: one wake-up of the loop for all of them
            self._loop.call_soon_threadsafe(self._settle_all, answers)
        self._check_peer(now_ns)
        return bool(got)

    @property
    def writing(self) -> bool:
        """Whether WRITEs of this end are in progress and the poll thread is the one to move them on."""
        return self.end.writing and not self.polled_elsewhere

    def _check_peer(self, now_ns: int) -> None:
        """Fail the waiting dispatches when the peer's heartbeats stopped (frozen or dead host)."""
        silent = now_ns - self._heard_ns
        if silent <= self.peer_timeout_ns or self.broken is not None:
            return
        with self._lock:
            waiting = any(not p.abandoned for p in self._pending.values())
        if waiting:
            error = Unavailable(
                f"{self.peer}: stopped answering (no NIXL heartbeat for {silent / 1e9:.2f} s)"
            )
            self._heard_ns = now_ns  # once
            self._loop.call_soon_threadsafe(self.fail, error)

    def _take(self, raw: bytes) -> _Answer | None:
        """Take one notification: a hot-path ticket is settled here; a coroutine's answer is returned,
        for ``poll`` to hand to the loop with the others of its look."""
        if raw == HEARTBEAT:
            return None
        if len(raw) != COMPLETION_BYTES or raw[:1] != COMPLETION_TAG:
            logger.warning("%s: a NIXL notification that is not a completion ignored", self.peer)
            return None
        completion = Completion.unpack(raw[1:])
        with self._lock:
            pending = self._pending.pop(completion.seq, None)
        if pending is None:
            logger.warning("%s: completion for unknown dispatch seq=%d ignored", self.peer, completion.seq)
            return None
        self.expert_ns += completion.queue_ns + completion.compute_ns
        slot = self.end.slot(pending.slot)
        outcome: Outcome
        leased = False
        if completion.status:
            header = memoryview(slot[:SLOT_HEADER_BYTES].cpu().numpy())  # type: ignore[arg-type]
            outcome = error_of(completion.status, read_slot_error(header, 0))
        elif completion.rows != pending.rows or completion.slot != pending.slot:
            outcome = InvalidArgument(
                f"{self.peer}: a completion of {completion.rows} rows in slot {completion.slot} for a "
                f"dispatch of {pending.rows} in slot {pending.slot}"
            )
        else:  # results were written over the rows
            outcome, leased = self._results(pending)
        sink = pending.sink
        if isinstance(sink, Ticket):
            if not leased:
                self._release(pending.slot)
            if not pending.abandoned:
                sink.settle(outcome if isinstance(outcome, AsapError) else ExchangeResult(outcome))
            return None
        return pending, outcome, leased

    def _results(self, pending: PendingDispatch) -> tuple[torch.Tensor, bool]:
        """The results in ``pending``'s slot: a view of the slot that keeps it taken until the last
        tensor on it is freed (a lease: no copy of N x H, which costs as much as the WRITE here, page
        faults of a fresh buffer included), or a copy when ``lease_cap`` slots are leased already; whether
        it is a lease."""
        g = self.end.geometry
        rows = pending.rows
        at = pending.slot * g.slot_bytes + g.payload(rows, shape_only=False)[0]
        n = rows * g.hidden_size * self.dtype.itemsize
        buf = self.end.buf
        with self._lock:
            lease = buf is not None and rows > 0 and self._leased < self.lease_cap
            if lease:
                self._leased += 1
                self.leases += 1
        if not lease or buf is None:
            view = self.end.slots[at : at + n]
            return view.view(self.dtype).view(rows, g.hidden_size).clone(), False
        holder = np.frombuffer(buf, dtype=np.uint8, count=n, offset=at)  # the tensor's storage owns it
        weakref.finalize(holder, self._unlease, pending.slot)
        return torch.from_numpy(holder).view(self.dtype).view(rows, g.hidden_size), True

    # --- senders (the event loop, or a compute thread with a ticket) ------------------------------

    def header(self, request: PlaneRequest) -> SlotHeader:
        """The header of the next dispatch, its sequence number taken (``publish`` gets it back)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        return dispatch_header(
            request.micro_batch, seq, request.layer, request.rows, request.traceparent, request.tracestate
        )

    def descriptor(self, slot: int, request: PlaneRequest, seq: int) -> bytes:
        return request_notification(
            dispatch_request(
                slot=slot,
                seq=seq,
                micro_batch=request.micro_batch,
                layer=request.layer,
                rows=request.rows,
                attention_rank=self.rank,
            )
        )

    def expect(
        self, slot: int, header: SlotHeader, ticket: Ticket | None = None
    ) -> asyncio.Future[torch.Tensor] | None:
        """Register the answer awaited for ``header``'s dispatch in ``slot`` before its WRITE is posted
        (a quick peer may answer before ``post`` returns): its future (on the loop), or None when
        ``ticket`` is to be settled instead."""
        future, sink = sink_for(self._loop, ticket)
        with self._lock:
            if self.broken is not None:
                raise self.broken
            self._pending[header.seq] = PendingDispatch(header.seq, slot, header.rows, sink)
        return future

    def unexpect(self, seq: int) -> None:
        """The WRITE of ``seq`` was never posted."""
        with self._lock:
            self._pending.pop(seq, None)

    def abandon(self, seq: int) -> None:
        with self._lock:
            pending = self._pending.get(seq)
            if pending is not None:
                pending.abandoned = True

    def _settle_all(self, answers: list[_Answer]) -> None:
        """On the loop: the answers one look took, to their coroutines' futures."""
        for pending, outcome, leased in answers:
            if not leased:  # a lease's slot comes back when its last tensor is freed
                self._release(pending.slot)
            future = pending.sink
            assert not isinstance(future, Ticket)
            settle_future(future, outcome)

    def fail(self, error: AsapError) -> None:
        """Break this end (on the event loop): every waiting dispatch fails with ``error``; its slots are
        never reused."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = error
            pending, self._pending = self._pending, {}
            self._slot_freed.notify_all()
        failed = fail_pending(pending.values(), error)
        self._fail_waiters(error)
        if failed:
            logger.warning("%s; failed %d waiting dispatches", error.message, failed)
        self.close()

    def close(self) -> None:
        if self.broken is None:
            self.broken = Unavailable(f"{self.peer}: NIXL link closed")
        nixl_poller().remove(self)
        self.end.close()
