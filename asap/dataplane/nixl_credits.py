"""Credits and result leases of the attention end of a NIXL link (``asap.dataplane.nixl_attention``).

The end's K slots are its credits: a sender takes a free one (the event loop awaits it, a hot-path
compute thread blocks for it) and it comes back when its answer is taken, or, for a result handed out as a
view of the slot (a lease), when the last tensor on that view is freed. At most ``lease_cap`` slots are
leased at once, so a consumer holding results cannot starve the senders. Once the end is broken, no slot
comes back: an abandoned dispatch's slot may still be written by its peer (the quarantine rule of
``asap.dataplane.link``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from asap.dataplane.direct import Ticket
from asap.dataplane.slot_plane import await_credit
from asap.errors import AsapError, Unavailable

__all__ = ["NixlSlotCredits"]


class NixlSlotCredits:
    """The slots of one NIXL attention end as credits, and the accounting of its leased results."""

    def __init__(self, slots: int, *, peer: str, loop: Any, lease_cap: int) -> None:
        self.peer = peer
        self._loop = loop
        self._free = list(range(slots))[::-1]
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._lock = threading.RLock()  # a lease's finalizer may run on a thread that holds it
        self._slot_freed = threading.Condition(self._lock)
        self.broken: AsapError | None = None
        self._leased = 0
        self.lease_cap = lease_cap
        """Results handed out as views of their slot at most at once (the other slots keep cycling, so
        a consumer holding results cannot starve the senders); 0 on GPU slots (copied out)."""
        self.leases = 0
        """Results handed out as views of their slot (not copied)."""

    # --- credits (any thread) ---------------------------------------------------------------------

    async def take_slot(self) -> int:
        """A free slot (a credit) on the event loop; waits while every slot is in use."""
        with self._lock:
            if self.broken is not None:
                raise self.broken
            if self._free:
                return self._free.pop()
            waiter: asyncio.Future[int] = self._loop.create_future()
            self._waiters.append(waiter)
        return await await_credit(waiter, self.give_back)

    def take_slot_blocking(self, ticket: Ticket, poll_s: float = 0.05) -> int:
        """A free slot for a hot-path sender (compute thread); blocks while every slot is in use, until
        one comes back, the end breaks (raised) or ``ticket`` is cancelled (``Unavailable``)."""
        with self._lock:
            while True:
                if self.broken is not None:
                    raise self.broken
                if ticket.cancelled:
                    raise Unavailable(f"{self.peer}: dispatch cancelled while waiting for a slot")
                if self._free and not self._waiters:
                    return self._free.pop()
                self._slot_freed.wait(poll_s)

    def give_back(self, slot: int) -> None:
        """A slot taken but never published (or answered)."""
        self._release(slot)

    def _release(self, slot: int) -> None:
        with self._lock:
            if self.broken is not None:
                return
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    self._loop.call_soon_threadsafe(self._hand, waiter, slot)
                    return
            self._free.append(slot)
            self._slot_freed.notify_all()

    def _hand(self, waiter: asyncio.Future[int], slot: int) -> None:
        if waiter.done():
            self._release(slot)
        else:
            waiter.set_result(slot)

    # --- leases (any thread) ----------------------------------------------------------------------

    def _unlease(self, slot: int) -> None:
        """The last tensor on a leased slot was freed (any thread)."""
        with self._lock:
            self._leased -= 1
        self._release(slot)
