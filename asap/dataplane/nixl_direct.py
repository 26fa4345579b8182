"""The NIXL plane's hot path (``asap.dataplane.direct``): the attention compute thread posts a dispatch's
WRITE itself and takes the completions itself, so a layer's round trip has no thread hop on this side
(before: event loop -> codec thread for the copy into the slot -> event loop, and poll thread -> event
loop -> compute thread for the answer).

There is no doorbell to sleep on (NIXL delivers notifications only to a caller that asks), so ``park``
gives no file descriptor: the compute thread looks again after ``SHORT_PARK_S`` at most, and while it
does so the process's NIXL poll thread leaves this end's notifications to it (it still watches the
peer's heartbeat). Dispatches larger than a slot go through the plane's ``inner`` path on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from asap.dataplane.direct import Ticket
from asap.dataplane.nixl_attention import NixlAttentionEnd
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import AsapError, InternalError, Unavailable

if TYPE_CHECKING:
    from asap.dataplane.nixl_plane import NixlPlane

__all__ = ["NixlDirect"]


class NixlDirect:
    """``DirectLink`` of a NIXL plane for one batch, bound to one connected end."""

    def __init__(self, plane: NixlPlane, end: NixlAttentionEnd, loop: asyncio.AbstractEventLoop) -> None:
        self.plane = plane
        self.end = end
        self.loop = loop

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        plane, end = self.plane, self.end
        if request.rows > plane.max_rows:  # more rows than a slot holds: the inner plane, via the loop
            self._post_inner(request, ticket)
            return
        slot = end.take_slot_blocking(ticket)
        seq = 0
        try:
            seq, _ = plane.send(end, slot, request, ticket)
        finally:
            if seq == 0:
                end.give_back(slot)
        ticket.plane_data = seq

    def _post_inner(self, request: PlaneRequest, ticket: Ticket) -> None:
        future = asyncio.run_coroutine_threadsafe(self.plane.inner.exchange(request), self.loop)

        def settle(f: concurrent.futures.Future[ExchangeResult]) -> None:
            if f.cancelled():
                ticket.settle(Unavailable(f"{self.end.peer}: dispatch cancelled"))
                return
            exc = f.exception()
            if exc is None:
                ticket.settle(f.result())
            else:
                ticket.settle(exc if isinstance(exc, AsapError) else InternalError(str(exc)))

        future.add_done_callback(settle)
        ticket.plane_data = future

    def poll(self) -> None:
        """Take the end's arrived completions (and move its WRITEs on) on this thread."""
        self.end.poll(time.monotonic_ns(), sweeper=False)

    def park(self, on: bool) -> Sequence[int]:
        """No descriptor to wait on (look again soon); while parked the poll thread leaves the end's
        notifications to this thread."""
        end = self.end
        end.polled_elsewhere = end.polled_elsewhere + 1 if on else max(0, end.polled_elsewhere - 1)
        return []

    def abandon(self, ticket: Ticket) -> None:
        data = ticket.plane_data
        if isinstance(data, concurrent.futures.Future):
            data.cancel()
        elif isinstance(data, int) and data:
            self.end.abandon(data)
