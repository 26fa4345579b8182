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

__all__ = ["ArmedSlot", "SlotDirect"]


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

    armable = False
    """Whether the plane fills a slot and publishes it in two calls (``_fill``, ``_publish``), so that
    ``arm`` can take and fill a slot now and send it later."""

    def _send(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        """Fill ``slot`` with ``request`` and publish it (settling ``ticket``); its sequence number."""
        self._fill(slot, request)
        return self._publish(slot, request, ticket)

    def _fill(self, slot: int, request: PlaneRequest) -> None:
        """Write ``request`` into ``slot``, unpublished (planes that are ``armable``)."""
        raise NotImplementedError

    def _publish(self, slot: int, request: PlaneRequest, ticket: Ticket) -> int:
        """Publish the filled ``slot`` (settling ``ticket``); its sequence number (``armable`` planes)."""
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

    def arm(self, request: PlaneRequest, ticket: Ticket) -> ArmedSlot | None:
        """``DirectLink.arm``: take a slot and fill it with ``request`` now (blocking as ``post`` does);
        None when this link cannot (not ``armable``, or the rows go through the inner plane)."""
        if not self.armable or self._to_inner(request):
            return None
        end = self.end
        slot = end.take_slot_blocking(ticket)
        try:
            self._fill(slot, request)
        except BaseException:
            end.give_back(slot)
            raise
        return ArmedSlot(self, slot, request, ticket)

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


class ArmedSlot:
    """A slot taken and filled by ``SlotDirect.arm``, not yet published: ``publish`` sends it, ``release``
    gives it back unsent; once either ran, both are no-ops."""

    __slots__ = ("_link", "_request", "_slot", "_ticket")

    def __init__(self, link: SlotDirect[Any, Any], slot: int, request: PlaneRequest, ticket: Ticket) -> None:
        self._link: SlotDirect[Any, Any] | None = link
        self._slot = slot
        self._request = request
        self._ticket = ticket

    def publish(self) -> None:
        """Send the filled slot (``post``'s second half; its errors); a failed publish gives it back."""
        link, self._link = self._link, None
        if link is None:
            return
        seq = 0
        try:
            seq = link._publish(self._slot, self._request, self._ticket)
        finally:
            if seq == 0:
                link.end.give_back(self._slot)
        self._ticket.plane_data = seq

    def release(self) -> None:
        """Give the slot back unsent."""
        link, self._link = self._link, None
        if link is not None:
            link.end.give_back(self._slot)
