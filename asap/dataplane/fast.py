"""``fast``: the per-layer exchange of same-host CPU ranks through descriptor rings and fixed slots in
shared memory, with no gRPC message, protobuf or thread hop per layer (DESIGN.md §9).

The link's gRPC stream stays: it carries the region's announcement (once per region, on a chunk that
needs no answer), its break is how a dead expert rank is noticed at once, and what the fast link does not
carry goes over it through the ``inner`` plane (``shm`` or ``grpc`` bytes): sync-mode dispatches (the
expert rank's barrier lives on its event loop) and dispatches with more rows than a slot holds. With
emulated compute the slots hold ids and weights only, and the modelled link time is charged by
timestamps (the expert takes a request only after its ``not_before``, the result is delivered after its
transfer time), not by event-loop sleeps that uvloop rounds to milliseconds.

The attention side is ``asap.dataplane.fast_attention``; the expert side ``expert_svc.fastlane``; the
memory layout ``asap.dataplane.fastlink``.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

from asap.dataplane.fast_attention import AttentionLinkEnd, shared_poller
from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.plane import DataPlane, ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest, PlaneStats
from asap.errors import Unavailable
from asap.faultbound import fault_bound_s, peer_timeout_s

__all__ = ["DEFAULT_PEER_TIMEOUT_S", "DEFAULT_SLOTS", "FastPlane", "slot_bytes_for"]

DEFAULT_SLOTS = 4
"""Slots per link: at least the micro-batches an attention rank keeps in flight (2 with dual-batch)."""
DEFAULT_PEER_TIMEOUT_S = peer_timeout_s(fault_bound_s())
"""A peer whose heartbeat is older than this while dispatches wait is taken for dead or frozen: 2.5 s of
the default 5 s failure bound of the reliability contract (``asap.faultbound``), before gRPC keepalive
breaks the stream (3 s at the earliest). (2 s failed healthy ranks still starting on a loaded 2-core
host; start-up now has its own bound, ``ATTACH_NS``.)"""
_SHAPE_ONLY_SLOT_BYTES = 4 * 1024 * 1024  # ids and weights of ~64k rows at top-8
_SLOT_BYTES = 48 * 1024 * 1024  # rows of an 8k-token dispatch at hidden 2048 in float32 with room to spare
_CODEC_FILL_BYTES = 1 << 20
"""Rows above this are copied into the slot on the codec thread, not on the event loop."""


def slot_bytes_for(spec: LinkSpec, slots: int) -> int:
    """Bytes per slot: ``region_bytes / slots`` when given, else a size for the worst common case
    (shared memory is touched lazily, so unused room costs no memory)."""
    if spec.region_bytes:
        size = spec.region_bytes // slots
    else:
        size = _SHAPE_ONLY_SLOT_BYTES if spec.shape_only else _SLOT_BYTES
    return max(8192, size // 4096 * 4096)


class FastPlane:
    """The ``fast`` plane of one link (see the module doc); ``inner`` carries what the slots cannot."""

    name = "fast"

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
        self.spec = spec
        self.stream = stream
        """The link's ``DuplexStream`` (``open()`` gives the live session, ``peer`` names the expert)."""
        self.inner = inner
        self._codec = codec
        self.slots = slots
        self.geometry: LinkGeometry | None = None
        """Set by the first dispatch (its routing gives top-k)."""
        self.max_rows = 0
        self.peer_timeout_s = peer_timeout_s
        self._end: AttentionLinkEnd | None = None
        self._session: object = None
        self._region_hidden_bytes = 0
        self.fast_exchanges = 0
        """Dispatches carried by the rings (the others went through ``inner``)."""

    @property
    def stats(self) -> PlaneStats:
        inner = self.inner.stats
        return PlaneStats(
            region_hidden_bytes=inner.region_hidden_bytes + self._region_hidden_bytes,
            inline_hidden_bytes=inner.inline_hidden_bytes,
            result_ref_bytes=inner.result_ref_bytes + self._region_hidden_bytes,
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
            self.max_rows = self.geometry.max_rows(shape_only=spec.shape_only)
        return self.geometry

    def _end_for(self, session: object, geometry: LinkGeometry) -> AttentionLinkEnd:
        """The link end of the live stream: a fresh region (announced on it) after a break or a new stream."""
        end = self._end
        if end is not None and end.broken is None and self._session is session and end.geometry is geometry:
            return end
        if end is not None:
            end.fail(Unavailable(f"{self.stream.peer}: fast link replaced"))
        spec = self.spec
        result_link_s = None
        if spec.link_s is not None:
            per_mib = spec.link_s(1 << 20)
            result_link_s = per_mib / (1 << 20)
        end = AttentionLinkEnd(
            geometry,
            attention_rank=spec.attention_rank,
            expert_rank=spec.expert_rank,
            dtype=spec.dtype,
            peer=self.stream.peer,
            peer_timeout_s=self.peer_timeout_s,
            result_link_s=result_link_s,
            loop=asyncio.get_running_loop(),
            poller=shared_poller(),
        )
        session.send(end.announcement())  # type: ignore[attr-defined]
        self._end, self._session = end, session
        return end

    async def exchange(self, request: PlaneRequest) -> ExchangeResult:
        geometry = self._geometry(int(request.dispatch.expert_ids.shape[1]))
        if request.sync is not None or request.rows > self.max_rows:
            return await self.inner.exchange(request)
        end = self._end_for(self.stream.open(), geometry)
        spec = self.spec
        dispatch = request.dispatch
        rows = request.rows
        shape_only = spec.shape_only
        slot = await end.take_slot()
        seq = 0
        try:
            header = end.header(
                request.micro_batch, request.layer, rows, request.traceparent, request.tracestate
            )
            hidden = None if shape_only else dispatch.hidden
            nbytes = rows * spec.hidden_size * spec.dtype.itemsize
            if hidden is not None and nbytes > _CODEC_FILL_BYTES:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(
                    self._codec, end.fill, slot, header, hidden, dispatch.expert_ids, dispatch.weights
                )
            else:
                end.fill(slot, header, hidden, dispatch.expert_ids, dispatch.weights)
            link_s = 0.0
            if spec.link_s is not None and rows:
                link_s = spec.link_s(rows * (nbytes // max(rows, 1) + geometry.top_k * 8))
            seq, future = end.publish(
                slot, request.micro_batch, request.layer, rows, shape_only=shape_only, link_s=link_s
            )
            if not shape_only:
                self._region_hidden_bytes += nbytes
            self.fast_exchanges += 1
            request.sent()
            return ExchangeResult(await future)
        finally:
            if seq == 0:
                end.give_back(slot)
            else:
                end.abandon(seq)  # no-op once answered

    def stream_opened(self) -> None:
        self.inner.stream_opened()

    def answer_dropped(self, key: ExchangeKey) -> None:
        self.inner.answer_dropped(key)

    def stream_ended(self) -> None:
        self.inner.stream_ended()
        if self._end is not None:
            self._end.fail(Unavailable(f"{self.stream.peer}: stream ended"))

    def close(self) -> None:
        if self._end is not None:
            self._end.close()
            self._end = None
        self.inner.close()
