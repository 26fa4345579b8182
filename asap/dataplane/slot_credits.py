"""The slots of a link's attention end as credits, shared by both ends that use them: the CPU fast
plane's (``asap.dataplane.fast_attention``) and the NIXL plane's (``asap.dataplane.nixl_credits``).

A sender takes a free slot before it fills it: the event loop awaits one (``take_slot``), a hot-path
compute thread blocks for one (``take_slot_blocking``). With every slot in use the sender waits, nothing is
dropped. A slot comes back (``give_back``, or the end's own ``_release`` once its answer is taken) to the
longest-waiting coroutine first, else to the free list, where blocked compute threads find it. Once the
end is broken no slot comes back: an abandoned dispatch's slot may still be written by its peer (the
quarantine rule of ``asap.dataplane.link``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from asap.dataplane.direct import Ticket
from asap.dataplane.ring import flush_deferred_wakes
from asap.dataplane.slot_plane import await_credit
from asap.errors import AsapError, Unavailable

__all__ = ["SlotCredits"]


class SlotCredits:
    """The K slots of one attention end as credits (see the module doc); ``_lock`` also guards whatever
    state a subclass keeps beside them, and ``_slot_freed`` is notified when a slot comes back or the end
    breaks."""

    def __init__(
        self,
        slots: int,
        *,
        peer: str,
        loop: asyncio.AbstractEventLoop,
        lock: threading.Lock | threading.RLock | None = None,
    ) -> None:
        self.peer = peer
        self._loop = loop
        self._free = list(range(slots))[::-1]
        self._waiters: deque[asyncio.Future[int]] = deque()
        """Coroutines waiting for a slot, longest first."""
        self._lock = threading.Lock() if lock is None else lock
        self._slot_freed = threading.Condition(self._lock)
        """Notified when a slot comes back or the end breaks (hot-path senders wait on it)."""
        self.broken: AsapError | None = None
        self.held_back = 0
        """Hot-path sends that waited for a free slot (backpressure; for tests and benchmarks)."""

    async def take_slot(self) -> int:
        """A free slot (a credit) on the event loop; waits while every slot is in use."""
        with self._lock:
            if self.broken is not None:
                raise self.broken
            if self._free:
                return self._free.pop()
            waiter: asyncio.Future[int] = self._loop.create_future()
            self._waiters.append(waiter)
        return await await_credit(waiter, self._release)

    def take_slot_blocking(self, ticket: Ticket, poll_s: float = 0.05) -> int:
        """A free slot for a hot-path sender (compute thread); blocks while every slot is in use, until
        one comes back, the end breaks (raised) or ``ticket`` is cancelled (``Unavailable``)."""
        held = False
        with self._lock:
            while True:
                if self.broken is not None:
                    raise self.broken
                if ticket.cancelled:
                    raise Unavailable(f"{self.peer}: dispatch cancelled while waiting for a slot")
                if self._free and not self._waiters:  # waiting coroutines are served first
                    return self._free.pop()
                if not held:
                    held = True
                    self.held_back += 1
                    flush_deferred_wakes()  # a peer not woken yet may be the one to free a slot
                self._slot_freed.wait(poll_s)

    def give_back(self, slot: int) -> None:
        """A slot taken but never published (or answered)."""
        self._release(slot)

    def _release(self, slot: int) -> None:
        """Give ``slot`` back (any thread): to a waiting coroutine first, else to the free list."""
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
        """On the loop: ``slot`` to ``waiter``, or back to the pool if it gave up meanwhile."""
        if waiter.done():
            self._release(slot)
        else:
            waiter.set_result(slot)

    def _fail_waiters(self, error: AsapError) -> None:
        """On the loop, once the end is broken: every coroutine waiting for a slot fails with ``error``."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
