"""What the hot-path links (``DirectLink``, ``asap.dataplane.direct``) of the slot planes share: the
CPU and GPU fast planes' and the NIXL plane's. The attention compute thread takes a slot itself (blocking
while every slot is in use), has the plane fill and publish it (``_send``, the plane's own) and gives the
slot back if that fails before the dispatch went out. A dispatch the slots cannot carry goes through the
plane's ``inner`` plane on the event loop, and settles its ticket from there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Generic, Protocol, TypeVar

from asap.dataplane.direct import Ticket
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.dataplane.slot_plane import SlotPlane
from asap.errors import AsapError, InternalError, Unavailable

__all__ = ["SlotDirect"]


class _End(Protocol):
    @property
    def peer(self) -> str: ...

    def take_slot_blocking(self, ticket: Ticket, poll_s: float = ...) -> int: ...

    def give_back(self, slot: int) -> None: ...

    def abandon(self, seq: int) -> None: ...


P = TypeVar("P", bound=SlotPlane[Any])
E = TypeVar("E", bound=_End)


class SlotDirect(Generic[P, E]):
    """``DirectLink`` of a slot plane (``P``) for one batch, posting into one link end (``E``)."""

    def __init__(self, plane: P, end: E, loop: asyncio.AbstractEventLoop) -> None:
        self.plane = plane
        self.end = end
        self.loop = loop

    def _send(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        """Fill ``slot`` with ``request`` and publish it (settling ``ticket``); its sequence number."""
        raise NotImplementedError

    def _to_inner(self, request: PlaneRequest) -> bool:
        """Whether ``request`` goes through the inner plane: more rows than a slot holds."""
        return request.rows > self.plane.max_rows

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        if self._to_inner(request):  # via the loop
            self._post_inner(request, ticket)
            return
        end = self.end
        slot = end.take_slot_blocking(ticket)
        seq = 0
        try:
            seq = self._send(slot, request, ticket)
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

    def abandon(self, ticket: Ticket) -> None:
        data = ticket.plane_data
        if isinstance(data, concurrent.futures.Future):
            data.cancel()
        elif isinstance(data, int) and data:
            self.end.abandon(data)
