"""``nixl``: the per-layer exchange of an attention rank with an expert rank on any host, as NIXL WRITEs
plus notifications into registered slots (DESIGN.md §10; the link's memory in ``asap.dataplane.nixl_link``).

Set-up, once per stream: a fresh link end (agent + K slots of the fast link's layout, host memory for CPU
ranks, GPU memory for GPU ranks) is announced on the link's gRPC stream (``DispatchChunk.nixl_link``,
micro-batch ``HANDSHAKE_MICRO_BATCH``); the expert rank answers with its own end, or an error
(``InvalidArgument`` for an announcement it cannot use) that fails the exchange. Per layer: take a slot
(a credit), fill it (slot header, rows, ids, weights), one WRITE of its used bytes into the expert's same
slot with the packed ``Request`` as the notification; the poll thread takes the ``Completion``
notification that follows the expert's WRITE of the results over the rows, copies them out and wakes the
waiting coroutine. Nothing per layer goes through gRPC or protobuf.

The stream stays for what the slots do not carry (``inner``, gRPC bytes: sync-mode dispatches and
dispatches larger than a slot) and its break is how a dead expert rank is noticed: every waiting dispatch
then fails with ``Unavailable`` at once and the next exchange sets up a fresh end. A frozen one (or a
host that went away without closing the stream) is noticed by its missing heartbeat notifications
(every 0.5 s from the expert end) after ``peer_timeout_s`` while dispatches wait. A dispatch abandoned
while the expert may still write its slot keeps that slot until its completion arrives or the end is
replaced (the quarantine rule of ``asap.dataplane.link``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from asap.dataplane.fast import DEFAULT_PEER_TIMEOUT_S, DEFAULT_SLOTS, slot_bytes_for
from asap.dataplane.fastlink import SLOT_HEADER_BYTES, Completion, LinkGeometry, Request, SlotHeader, error_of
from asap.dataplane.fastlink import read_error as read_slot_error
from asap.dataplane.nixl_link import HANDSHAKE_MICRO_BATCH, HEARTBEAT, NixlEnd, nixl_poller
from asap.dataplane.plane import DataPlane, ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest, PlaneStats
from asap.errors import AsapError, InvalidArgument, Unavailable
from asap.rpc.status import error_from_wire
from asap.v1 import expert_pb2

__all__ = ["NixlPlane", "fill_slot"]

logger = logging.getLogger(__name__)

_REQUEST_TAG = b"R"
_COMPLETION_TAG = b"C"
_COMPLETION_BYTES = 1 + struct.calcsize("<QIIIIQQQQ")
_CODEC_FILL_BYTES = 1 << 20
"""Rows above this are copied into the slot on the codec thread, not on the event loop."""


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


class _AttentionEnd:
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
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back(waiter.result())
            raise

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


class NixlPlane:
    """The ``nixl`` plane of one link (see the module doc); ``inner`` carries what the slots cannot."""

    name = "nixl"

    def __init__(
        self,
        spec: LinkSpec,
        stream: Any,
        codec: Executor,
        inner: DataPlane,
        *,
        slots: int = DEFAULT_SLOTS,
        peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S,
    ) -> None:
        self.peer_timeout_s = peer_timeout_s
        if spec.shape_only:
            raise InvalidArgument("the nixl data plane moves activations: not with emulated compute")
        self.spec = spec
        self.stream = stream
        self.inner = inner
        self._codec = codec
        self.slots = slots
        self.geometry: LinkGeometry | None = None
        self.max_rows = 0
        self._end: _AttentionEnd | None = None
        self._session: object = None
        self._connecting: asyncio.Future[_AttentionEnd] | None = None
        self._hidden_bytes = 0
        self.nixl_exchanges = 0
        """Dispatches carried by NIXL (the others went through ``inner``)."""

    @property
    def stats(self) -> PlaneStats:
        inner = self.inner.stats
        return PlaneStats(
            region_hidden_bytes=inner.region_hidden_bytes + self._hidden_bytes,
            inline_hidden_bytes=inner.inline_hidden_bytes,
            result_ref_bytes=inner.result_ref_bytes + self._hidden_bytes,
            quarantined=inner.quarantined,
        )

    def _geometry(self, top_k: int) -> LinkGeometry:
        if self.geometry is None or self.geometry.top_k != top_k:
            spec = self.spec
            self.geometry = LinkGeometry(
                slots=self.slots,
                slot_bytes=slot_bytes_for(spec, self.slots),
                hidden_size=spec.hidden_size,
                top_k=top_k,
                itemsize=spec.dtype.itemsize,
            )
            self.max_rows = self.geometry.max_rows(shape_only=False)
        return self.geometry

    async def _end_for(self, geometry: LinkGeometry) -> _AttentionEnd:
        """The connected end of the live stream; a fresh one (announced on it) after a break."""
        session = self.stream.open()
        end = self._end
        if (
            end is not None
            and end.broken is None
            and self._session is session
            and end.end.geometry is geometry
        ):
            return end
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            end = await self._connect(session, geometry)
        except BaseException as exc:
            self._connecting.set_exception(exc)
            self._connecting.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        else:
            self._connecting.set_result(end)
        finally:
            self._connecting = None
        return end

    async def _connect(self, session: object, geometry: LinkGeometry) -> _AttentionEnd:
        if self._end is not None:
            self._end.fail(Unavailable(f"{self.stream.peer}: NIXL link replaced"))
            self._end = None
        spec = self.spec
        loop = asyncio.get_running_loop()
        local = await loop.run_in_executor(
            self._codec, NixlEnd, f"a{spec.attention_rank}-e{spec.expert_rank}", geometry, spec.device
        )
        try:
            announcement = expert_pb2.DispatchChunk(
                micro_batch=HANDSHAKE_MICRO_BATCH,
                attention_rank=spec.attention_rank,
                nixl_link=local.announcement(),
            )
            answer = await self.stream.request((HANDSHAKE_MICRO_BATCH, 0), announcement)
            if answer.HasField("error"):
                raise error_from_wire(answer.error, f"{self.stream.peer}: NIXL link refused")
            if not answer.HasField("nixl_link"):
                raise InvalidArgument(f"{self.stream.peer}: NIXL link announcement answered without a link")
            local.connect(answer.nixl_link)
        except BaseException:
            local.close()
            raise
        end = _AttentionEnd(
            local,
            peer=self.stream.peer,
            dtype=spec.dtype,
            rank=spec.attention_rank,
            loop=loop,
            peer_timeout_s=self.peer_timeout_s,
        )
        nixl_poller().add(end)
        self._end, self._session = end, session
        return end

    async def exchange(self, request: PlaneRequest) -> ExchangeResult:
        geometry = self._geometry(int(request.dispatch.expert_ids.shape[1]))
        if request.sync is not None or request.rows > self.max_rows:
            return await self.inner.exchange(request)
        end = await self._end_for(geometry)
        dispatch = request.dispatch
        slot = await end.take_slot()
        seq = 0
        try:
            header = end.header(request)
            nbytes = request.rows * self.spec.hidden_size * self.spec.dtype.itemsize
            args = (
                end.end.slot(slot),
                geometry,
                self.spec.dtype,
                header,
                dispatch.hidden,
                dispatch.expert_ids,
                dispatch.weights,
            )
            on_gpu = self.spec.device.type == "cuda"
            if on_gpu or nbytes > _CODEC_FILL_BYTES:
                end_byte = await asyncio.get_running_loop().run_in_executor(
                    self._codec, self._fill, dispatch.ready, args
                )
            else:
                end_byte = fill_slot(*args)
            seq, future = end.publish(slot, request, end_byte)
            self._hidden_bytes += nbytes
            self.nixl_exchanges += 1
            request.sent()
            return ExchangeResult(await future)
        finally:
            if seq == 0:
                end.give_back(slot)
            else:
                end.abandon(seq)

    def _fill(self, ready: torch.cuda.Event | None, args: tuple[Any, ...]) -> int:
        """On the codec thread: the rows into the slot (after the compute stream made them, on GPU)."""
        if self.spec.device.type != "cuda":
            return fill_slot(*args)
        stream = torch.cuda.current_stream(self.spec.device)
        if ready is not None:
            stream.wait_event(ready)
        end_byte = fill_slot(*args)
        stream.synchronize()  # the slot's bytes are in GPU memory before NIXL reads them
        return end_byte

    def stream_opened(self) -> None:
        self.inner.stream_opened()

    def answer_dropped(self, key: ExchangeKey) -> None:
        if key[0] != HANDSHAKE_MICRO_BATCH:
            self.inner.answer_dropped(key)

    def stream_ended(self) -> None:
        self.inner.stream_ended()
        if self._end is not None:
            self._end.fail(Unavailable(f"{self.stream.peer}: stream ended"))

    def close(self) -> None:
        if self._end is not None:
            with contextlib.suppress(Exception):
                self._end.close()
            self._end = None
        self.inner.close()
