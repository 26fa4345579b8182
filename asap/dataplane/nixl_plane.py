"""``nixl``: the per-layer exchange of an attention rank with an expert rank on any host, as NIXL WRITEs
plus notifications into registered slots (DESIGN.md §10; the link end in ``asap.dataplane.nixl_attention``,
its memory in ``asap.dataplane.nixl_link``).

Set-up, once per stream: a fresh link end (agent + K slots of the fast link's layout, host memory for CPU
ranks, GPU memory for GPU ranks) is announced on the link's gRPC stream (``DispatchChunk.nixl_link``,
micro-batch ``HANDSHAKE_MICRO_BATCH``); the expert rank answers with its own end, or an error
(``InvalidArgument`` for an announcement it cannot use) that fails the exchange. Per layer: take a slot
(a credit), one WRITE into the expert's same slot of the slot header and routing and of the rows from
the memory they already live in (registered for it; GPU rows are copied into the GPU slot), with the
packed ``Request`` as the notification; the ``Completion`` notification follows the expert's WRITE of
the results over the rows; they are copied out by the thread that takes it. On the hot path
(``direct``, async mode, once the stream has a connected end) the attention compute thread posts and
takes the completions itself (``asap.dataplane.nixl_direct``); on the loop path the process's poll
thread takes them and wakes the waiting coroutine. Nothing per layer goes through gRPC or protobuf.

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

import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.fastlink import LinkGeometry, SlotHeader
from asap.dataplane.nixl_attention import NixlAttentionEnd
from asap.dataplane.nixl_direct import NixlDirect
from asap.dataplane.nixl_dispatch import fill_slot, write_dispatch
from asap.dataplane.nixl_link import HANDSHAKE_MICRO_BATCH, NixlEnd, nixl_poller
from asap.dataplane.offloop import on_thread
from asap.dataplane.plane import ExchangeKey, ExchangeResult, PlaneRequest
from asap.dataplane.slot_plane import SlotPlane
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
    direct_exchanges = 0
    """Those of them posted on the hot path (by the attention compute thread, ``direct``)."""

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
        slot = await end.take_slot()
        posted: list[int] = []  # the sequence number, once posted (a cancelled copy may still post it)

        def send() -> asyncio.Future[torch.Tensor] | None:
            seq, future = self.send(end, slot, request, None)
            posted.append(seq)
            return future

        try:
            nbytes = request.rows * self.spec.hidden_size * self.spec.dtype.itemsize
            if self.spec.device.type == "cuda" and nbytes:  # the copy into GPU slots off the loop
                future = await on_thread(self._codec, send)
            else:  # host memory: nothing is copied but the routing (64 bytes a row)
                future = send()
            assert future is not None
            return ExchangeResult(await future)
        finally:
            if posted:
                end.abandon(posted[0])  # no-op once answered
            else:
                end.give_back(slot)

    def send(
        self, end: NixlAttentionEnd, slot: int, request: PlaneRequest, ticket: Ticket | None
    ) -> tuple[int, asyncio.Future[torch.Tensor] | None]:
        """Post one dispatch in ``slot`` (any thread): its sequence number and the future of its result
        (None when ``ticket`` is settled instead); counts it and calls ``request.sent``."""
        dispatch = request.dispatch
        header = end.header(request)
        future = end.expect(slot, header, ticket)
        note = end.descriptor(slot, request, header.seq)
        try:
            if self.spec.device.type == "cuda":
                self._fill_gpu(end, slot, header, request)
                end.end.write(slot, 0, end.end.geometry.payload(request.rows, shape_only=False)[3], note)
            else:
                write_dispatch(
                    end.end, slot, self.spec.dtype, header, dispatch.hidden, dispatch.expert_ids,
                    dispatch.weights, note,
                )  # fmt: skip
        except BaseException:
            end.unexpect(header.seq)
            raise
        self._hidden_bytes += request.rows * self.spec.hidden_size * self.spec.dtype.itemsize
        self.nixl_exchanges += 1
        self.direct_exchanges += ticket is not None
        request.sent()
        return header.seq, future

    def _fill_gpu(self, end: NixlAttentionEnd, slot: int, header: SlotHeader, request: PlaneRequest) -> None:
        """The rows into the GPU slot after the compute stream made them; in GPU memory before NIXL
        reads them."""
        d = request.dispatch
        stream = torch.cuda.current_stream(self.spec.device)
        if d.ready is not None:
            stream.wait_event(d.ready)
        g = end.end.geometry
        fill_slot(end.end.slot(slot), g, self.spec.dtype, header, d.hidden, d.expert_ids, d.weights)
        stream.synchronize()

    def direct(self, top_k: int) -> NixlDirect | None:
        """The hot path for one batch (on the event loop, at its start): the compute thread posts the
        WRITEs and takes the completions itself (``asap.dataplane.nixl_direct``). None until the live
        stream has a connected end (the batch then goes through ``exchange``, which connects one)."""
        geometry = self._geometry(top_k)
        end = self._end
        if (
            end is None
            or end.broken is not None
            or self._session is not self.stream.open()
            or end.end.geometry is not geometry
        ):
            return None
        return NixlDirect(self, end, asyncio.get_running_loop())

    def answer_dropped(self, key: ExchangeKey) -> None:
        if key[0] != HANDSHAKE_MICRO_BATCH:
            self.inner.answer_dropped(key)

    def close(self) -> None:
        if self._end is not None:
            with contextlib.suppress(Exception):
                self._end.close()
            self._end = None
        self.inner.close()
