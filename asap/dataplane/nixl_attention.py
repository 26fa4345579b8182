"""The attention rank's end of one NIXL link (DESIGN.md §10; the plane that drives it is
``asap.dataplane.nixl_plane``, the link's memory ``asap.dataplane.nixl_link``): its K slots as credits,
filling a slot in the fast link's layout, the WRITE of a dispatch with its ``Request`` as the
notification and, on the process's NIXL poll thread, the ``Completion`` notifications that follow the
expert's WRITE of the results over the rows (copied out before the slot is reused; the waiting
coroutine is woken on the event loop). A missing heartbeat for ``peer_timeout_s`` while dispatches wait
fails them all with ``Unavailable``; an abandoned dispatch keeps its slot until its completion arrives
or the end is replaced (the quarantine rule of ``asap.dataplane.link``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from asap.dataplane.fastlink import SLOT_HEADER_BYTES, Completion, LinkGeometry, Request, SlotHeader, error_of
from asap.dataplane.fastlink import read_error as read_slot_error
from asap.dataplane.nixl_link import HEARTBEAT, NixlEnd, nixl_poller
from asap.dataplane.plane import PlaneRequest
from asap.dataplane.slot_plane import await_credit
from asap.errors import AsapError, InvalidArgument, Unavailable

__all__ = ["NixlAttentionEnd", "completion_notification", "fill_slot", "request_notification"]

logger = logging.getLogger(__name__)

_REQUEST_TAG = b"R"
_COMPLETION_TAG = b"C"
_COMPLETION_BYTES = 1 + struct.calcsize("<QIIIIQQQQ")


def request_notification(request: Request) -> bytes:
    return _REQUEST_TAG + request.pack()


def completion_notification(completion: Completion) -> bytes:
    return _COMPLETION_TAG + completion.pack()


def fill_slot(
    slot: torch.Tensor,
    geometry: LinkGeometry,
    dtype: torch.dtype,
    header: SlotHeader,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
) -> int:
    """Write one dispatch into ``slot`` (its bytes, host or GPU) in the fast link's layout; returns the
    end of what was written (the WRITE's length)."""
    rows = header.rows
    hidden_at, ids_at, weights_at, end = geometry.payload(rows, shape_only=False)
    raw = bytearray(SLOT_HEADER_BYTES)
    header.write(memoryview(raw), 0)
    slot[:SLOT_HEADER_BYTES].copy_(torch.frombuffer(raw, dtype=torch.uint8))
    if rows:
        n = rows * geometry.hidden_size * dtype.itemsize
        slot[hidden_at : hidden_at + n].view(dtype).view(rows, geometry.hidden_size).copy_(hidden)
        k = rows * geometry.top_k * 4
        ids = expert_ids.detach().to(dtype=torch.int32).contiguous().view(-1).view(torch.uint8)
        slot[ids_at : ids_at + k].copy_(ids)
        w = weights.detach().to(dtype=torch.float32).contiguous().view(-1).view(torch.uint8)
        slot[weights_at : weights_at + k].copy_(w)
    return end


@dataclass(slots=True, eq=False)
class _Pending:
    seq: int
    slot: int
    rows: int
    future: asyncio.Future[torch.Tensor]
    abandoned: bool = False


class NixlAttentionEnd:
    """One connected NIXL end of a link, attention side (served by the process's NIXL poll thread)."""

    def __init__(
        self, end: NixlEnd, *, peer: str, dtype: torch.dtype, rank: int, loop: Any, peer_timeout_s: float
    ) -> None:
        self.end = end
        self.peer_timeout_ns = int(peer_timeout_s * 1e9)
        self._heard_ns = time.monotonic_ns()
        """When the peer was last heard from (any notification: completions and its heartbeats)."""
        self.peer = peer
        self.dtype = dtype
        self.rank = rank
        self._loop = loop
        self._free = list(range(end.geometry.slots))[::-1]
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self.broken: AsapError | None = None

    # --- poll thread ------------------------------------------------------------------------------

    def poll(self, now_ns: int) -> bool:
        error = self.end.reap()
        if error:
            self._loop.call_soon_threadsafe(self.fail, Unavailable(f"{self.peer}: {error}"))
        got = self.end.notifications()
        if got:
            self._heard_ns = now_ns
        for raw in got:
            self._take(raw)
        self._check_peer(now_ns)
        return bool(got) or self.end.writing

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

    def _take(self, raw: bytes) -> None:
        if raw == HEARTBEAT:
            return
        if len(raw) != _COMPLETION_BYTES or raw[:1] != _COMPLETION_TAG:
            logger.warning("%s: a NIXL notification that is not a completion ignored", self.peer)
            return
        completion = Completion.unpack(raw[1:])
        with self._lock:
            pending = self._pending.pop(completion.seq, None)
        if pending is None:
            logger.warning("%s: completion for unknown dispatch seq=%d ignored", self.peer, completion.seq)
            return
        g = self.end.geometry
        slot = self.end.slot(pending.slot)
        outcome: torch.Tensor | AsapError
        if completion.status:
            header = memoryview(slot[:SLOT_HEADER_BYTES].cpu().numpy())  # type: ignore[arg-type]
            outcome = error_of(completion.status, read_slot_error(header, 0))
        elif completion.rows != pending.rows or completion.slot != pending.slot:
            outcome = InvalidArgument(
                f"{self.peer}: a completion of {completion.rows} rows in slot {completion.slot} for a "
                f"dispatch of {pending.rows} in slot {pending.slot}"
            )
        else:  # results were written over the rows: copy them out before the slot is reused
            at = g.payload(pending.rows, shape_only=False)[0]
            n = pending.rows * g.hidden_size * self.dtype.itemsize
            outcome = slot[at : at + n].view(self.dtype).view(pending.rows, g.hidden_size).clone()
        self._loop.call_soon_threadsafe(self._settle, pending, outcome)

    # --- event loop -------------------------------------------------------------------------------

    async def take_slot(self) -> int:
        if self.broken is not None:
            raise self.broken
        if self._free:
            return self._free.pop()
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append(waiter)
        return await await_credit(waiter, self.give_back)

    def give_back(self, slot: int) -> None:
        if self.broken is not None:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    def header(self, request: PlaneRequest) -> SlotHeader:
        return SlotHeader(
            request.micro_batch,
            self._seq + 1,
            request.layer,
            request.rows,
            time.time_ns(),
            request.traceparent,
            request.tracestate,
        )

    def publish(
        self, slot: int, request: PlaneRequest, end_byte: int
    ) -> tuple[int, asyncio.Future[torch.Tensor]]:
        if self.broken is not None:
            raise self.broken
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[torch.Tensor] = self._loop.create_future()
        with self._lock:
            self._pending[seq] = _Pending(seq, slot, request.rows, future)
        descriptor = Request(
            micro_batch=request.micro_batch,
            layer=request.layer,
            slot=slot,
            rows=request.rows,
            flags=0,
            seq=seq,
            sent_unix_ns=time.time_ns(),
            not_before_ns=0,
            attention_rank=self.rank,
        )
        try:
            self.end.write(slot, 0, end_byte, request_notification(descriptor))
        except AsapError:
            with self._lock:
                self._pending.pop(seq, None)
            raise
        return seq, future

    def abandon(self, seq: int) -> None:
        with self._lock:
            pending = self._pending.get(seq)
            if pending is not None:
                pending.abandoned = True

    def _settle(self, pending: _Pending, outcome: torch.Tensor | AsapError) -> None:
        self.give_back(pending.slot)
        if pending.future.done():
            return
        if isinstance(outcome, AsapError):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    def fail(self, error: AsapError) -> None:
        """Break this end: every waiting dispatch fails with ``error``; its slots are never reused."""
        if self.broken is not None:
            return
        self.broken = error
        with self._lock:
            pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry.future.done():
                entry.future.set_exception(error)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
        if pending:
            logger.warning("%s; failed %d waiting dispatches", error.message, len(pending))
        self.close()

    def close(self) -> None:
        if self.broken is None:
            self.broken = Unavailable(f"{self.peer}: NIXL link closed")
        nixl_poller().remove(self)
        self.end.close()
