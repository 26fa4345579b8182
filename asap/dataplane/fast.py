"""``fast``: the per-layer exchange of same-host CPU ranks through descriptor rings and fixed slots in
shared memory, with no gRPC message, protobuf or thread hop per layer (DESIGN.md §9).

The link's gRPC stream stays: it carries the region's announcement (once per region, on a chunk that
needs no answer), its break is how a dead expert rank is noticed at once, and what the fast link does not
carry goes over it through the ``inner`` plane (``shm`` or ``grpc`` bytes): sync-mode dispatches (the
expert rank's barrier lives on its event loop) and dispatches with more rows than a slot holds. With
emulated compute the slots hold ids and weights only, and the modelled link time is charged by
timestamps (the expert takes a request only after its ``not_before``, the result is delivered after its
transfer time), not by event-loop sleeps that uvloop rounds to milliseconds.

Hot path (``asap.dataplane.direct``): ``direct`` hands the attention executor a handle through which its
compute thread posts async-mode dispatches and is woken by the poll thread with their results, with no
event loop per layer; ``exchange`` stays for the event-loop path (sync modes, other callers). Both share
the link end, its credits and its failure handling.

The attention side is ``asap.dataplane.fast_attention``; the expert side ``expert_svc.fastlane``; the
memory layout ``asap.dataplane.fastlink``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.fast_attention import ATTACH_S, AttentionLinkEnd, shared_poller
from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.offloop import on_thread
from asap.dataplane.plane import DataPlane, ExchangeKey, ExchangeResult, LinkSpec, PlaneRequest
from asap.dataplane.ring import WAIT_BELL, WAIT_FUTEX, full_fence
from asap.dataplane.slot_direct import SlotDirect
from asap.dataplane.slot_plane import (
    CODEC_FILL_BYTES,
    DEFAULT_PEER_TIMEOUT_S,
    DEFAULT_SLOTS,
    SlotPlane,
    slot_bytes_for,
)
from asap.errors import InternalError, InvalidArgument, Unavailable

__all__ = [
    "ATTACH_S",
    "DEFAULT_PEER_TIMEOUT_S",
    "DEFAULT_SLOTS",
    "FastOptions",
    "FastPlane",
    "slot_bytes_for",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FastOptions:
    """The fast plane's failure bounds, from the attention rank's config (``--fast-peer-timeout``,
    ``--fast-attach-timeout``)."""

    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    """A peer whose heartbeat is older than this while dispatches wait fails them (``Unavailable``)."""
    attach_s: float = ATTACH_S
    """How long an announced region may wait for the expert rank's first heartbeat."""

    def __post_init__(self) -> None:
        if self.peer_timeout_s <= 0 or self.attach_s <= 0:
            raise InvalidArgument(
                f"fast plane timeouts must be > 0, got peer {self.peer_timeout_s} s, attach {self.attach_s} s"
            )


REANNOUNCE_NS = 5_000_000_000
"""An announced region that no expert rank attached and no dispatch used for this long is replaced by a
fresh announcement before the next dispatch (instead of that dispatch failing at once as "never
attached" once the attach bound has passed since the announcement)."""


class FastPlane(SlotPlane[AttentionLinkEnd]):
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
        attach_s: float = ATTACH_S,
    ) -> None:
        super().__init__(spec, stream, codec, inner, slots=slots, peer_timeout_s=peer_timeout_s)
        self.attach_s = attach_s
        self._quarantined_before = 0
        """Abandoned dispatches counted by link ends already replaced."""
        self.fast_exchanges = 0
        """Dispatches carried by the rings (the others went through ``inner``)."""

    def _quarantined(self) -> int:
        return self._quarantined_before + (self._end.quarantined if self._end is not None else 0)

    def _end_for(self, session: object, geometry: LinkGeometry) -> AttentionLinkEnd:
        """The link end of the live stream: a fresh region (announced on it) after a break or a new stream."""
        end = self._end
        if end is not None and end.broken is None and self._session is session and end.geometry is geometry:
            idle_ns = end.unattached_idle_ns(time.monotonic_ns())
            if idle_ns <= REANNOUNCE_NS:
                return end
            # Rare (about one link end in a thousand in a 12-minute soak, cause not found yet): the
            # expert never attached an announced region. Fail nothing; announce a fresh one.
            logger.warning(
                "%s: fast link region %s never attached in %.1f s; announcing a fresh one",
                self.stream.peer,
                end.region.name,
                idle_ns / 1e9,
            )
        if end is not None:
            end.fail(Unavailable(f"{self.stream.peer}: fast link replaced"))
            self._quarantined_before += end.quarantined
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
            attach_s=self.attach_s,
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
        slot = await end.take_slot()
        seq = 0
        try:
            nbytes = request.rows * self.spec.hidden_size * self.spec.dtype.itemsize
            fill_on_codec = not self.spec.shape_only and nbytes > CODEC_FILL_BYTES
            header = self._header(end, slot, request)
            if fill_on_codec:  # the slot is given back only once the fill has ended
                await on_thread(self._codec, self._fill, end, slot, header, request)
            else:
                self._fill(end, slot, header, request)
            seq, future = self._publish(end, slot, request)
            assert future is not None
            return ExchangeResult(await future)
        finally:
            if seq == 0:
                end.give_back(slot)
            else:
                end.abandon(seq)  # no-op once answered

    def direct(self, top_k: int) -> _Direct:
        """The hot path for one batch (on the event loop, at its start): bound to the live stream's link
        end, announced now if there is none. ``Unavailable`` when the stream cannot be opened."""
        geometry = self._geometry(top_k)
        return _Direct(self, self._end_for(self.stream.open(), geometry), asyncio.get_running_loop())

    def _header(self, end: AttentionLinkEnd, slot: int, request: PlaneRequest) -> Any:
        return end.header(
            request.micro_batch, request.layer, request.rows, request.traceparent, request.tracestate, slot
        )

    def _fill(self, end: AttentionLinkEnd, slot: int, header: Any, request: PlaneRequest) -> None:
        d = request.dispatch
        end.fill(slot, header, None if self.spec.shape_only else d.hidden, d.expert_ids, d.weights)

    def _publish(
        self, end: AttentionLinkEnd, slot: int, request: PlaneRequest, ticket: Ticket | None = None
    ) -> tuple[int, asyncio.Future[torch.Tensor] | None]:
        """Publish a filled slot (any thread); counts it and calls ``request.sent``."""
        spec = self.spec
        rows = request.rows
        nbytes = rows * spec.hidden_size * spec.dtype.itemsize
        link_s = 0.0
        if spec.link_s is not None and rows:
            assert self.geometry is not None
            link_s = spec.link_s(rows * (nbytes // max(rows, 1) + self.geometry.top_k * 8))
        seq, future = end.publish(
            slot,
            request.micro_batch,
            request.layer,
            rows,
            shape_only=spec.shape_only,
            link_s=link_s,
            ticket=ticket,
        )
        if not spec.shape_only:
            self._hidden_bytes += nbytes
        self.fast_exchanges += 1
        request.sent()
        return seq, future

    def answer_dropped(self, key: ExchangeKey) -> None:
        self.inner.answer_dropped(key)

    def close(self) -> None:
        if self._end is not None:
            self._end.close()
            self._end = None
        self.inner.close()


class _Direct(SlotDirect[FastPlane, AttentionLinkEnd]):
    """``DirectLink`` of a fast plane for one batch: posts from the compute thread into one link end."""

    spin_wait = True
    """The waiting compute thread may spin briefly before it parks (``asap.dataplane.spin``): a CPU
    link, whose answers the compute thread takes itself (``poll``)."""

    armable = True

    def _fill(self, slot: int, request: PlaneRequest) -> None:
        plane, end = self.plane, self.end
        try:
            plane._fill(end, slot, plane._header(end, slot, request), request)
        except (ValueError, IndexError, TypeError, struct.error) as exc:  # the region retired under the fill
            self._raise_typed(exc)

    def _publish(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        try:
            seq, _ = self.plane._publish(self.end, slot, request, ticket)
        except (ValueError, IndexError, TypeError, struct.error) as exc:  # retired since the fill
            self._raise_typed(exc)
        return seq

    def _raise_typed(self, exc: Exception) -> NoReturn:
        """A fill or publish that failed on a region retired under it: the link's failure."""
        end = self.end
        if end.broken is not None:
            raise end.broken from None
        raise InternalError(f"{end.peer}: filling a fast link slot failed: {exc}") from exc

    def poll(self) -> None:
        """Take the link end's arrived completions on this thread (``DirectLink.poll``)."""
        try:
            self.end.poll(time.monotonic_ns())
        except (ValueError, IndexError, TypeError, struct.error):
            if self.end.broken is None:  # not a retired region: a real fault, typed by the caller
                raise
            # Retired under the poll (a dead peer): ``fail`` has settled every waiting ticket already.

    def park(self, on: bool) -> Sequence[int]:
        """``DirectLink.park``: the completion ring's waiting flag (counted: the poll thread may be parked
        on it too) and its doorbell."""
        end = self.end
        if on:
            end.parked_elsewhere += 1
        else:
            end.parked_elsewhere = max(0, end.parked_elsewhere - 1)
        try:
            end.completions.set_waiting(on, WAIT_BELL)
            full_fence()  # the flag's store before the caller's look at the ring
            if on and end.held():  # a result waits for its modelled transfer: no bell will come
                return []
            return [end.completion_bell.fileno()] if on else []
        except (ValueError, IndexError, TypeError, struct.error):  # the end was closed meanwhile
            return []  # (a released region's views raise any of these; ``poll`` and the fill catch the same)

    def park_futex(self, on: bool) -> tuple[int, int] | None:
        """``DirectLink.park_futex``: the completion ring's waiting word itself (the expert's
        ``Ring.wake`` clears it and wakes whoever sleeps on it), counted as ``park`` counts."""
        end = self.end
        ring = end.completions
        if on:
            end.parked_elsewhere += 1
        else:
            end.parked_elsewhere = max(0, end.parked_elsewhere - 1)
        try:
            state = ring.set_waiting(on, WAIT_FUTEX)
            full_fence()  # the word's store before the caller's look at the ring
            if not on or end.held() or not ring.waiting_address:  # held: no wake-up will come
                return None
            return ring.waiting_address, state
        except (ValueError, IndexError, TypeError, struct.error):  # the end was closed meanwhile
            return None
