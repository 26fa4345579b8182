"""``nixl``: the per-layer exchange of an attention rank with an expert rank on any host, as NIXL WRITEs
plus notifications into registered slots (DESIGN.md §10; the link end in ``asap.dataplane.nixl_attention``,
its memory in ``asap.dataplane.nixl_link``).

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
from typing import Any

import torch

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.nixl_attention import NixlAttentionEnd, fill_slot
from asap.dataplane.nixl_link import HANDSHAKE_MICRO_BATCH, NixlEnd, nixl_poller
from asap.dataplane.plane import ExchangeKey, ExchangeResult, PlaneRequest
from asap.dataplane.slot_plane import CODEC_FILL_BYTES, SlotPlane
from asap.errors import InvalidArgument, Unavailable
from asap.rpc.status import error_from_wire
from asap.v1 import expert_pb2

__all__ = ["NixlPlane"]


class NixlPlane(SlotPlane[NixlAttentionEnd]):
    """The ``nixl`` plane of one link (see the module doc); ``inner`` carries what the slots cannot."""

    name = "nixl"

    values_only = True
    _connecting: asyncio.Future[NixlAttentionEnd] | None = None
    """The end being connected, which concurrent dispatches wait for."""
    nixl_exchanges = 0
    """Dispatches carried by NIXL (the others went through ``inner``)."""

    async def _end_for(self, geometry: LinkGeometry) -> NixlAttentionEnd:
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

    async def _connect(self, session: object, geometry: LinkGeometry) -> NixlAttentionEnd:
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
        end = NixlAttentionEnd(
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
            if on_gpu or nbytes > CODEC_FILL_BYTES:
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

    def answer_dropped(self, key: ExchangeKey) -> None:
        if key[0] != HANDSHAKE_MICRO_BATCH:
            self.inner.answer_dropped(key)

    def close(self) -> None:
        if self._end is not None:
            with contextlib.suppress(Exception):
                self._end.close()
            self._end = None
        self.inner.close()
