"""The hot-path capability of a data plane: dispatches posted and completions taken by the attention rank's
compute thread itself, with no event loop per layer.

Why: on a loaded host every thread wake costs 150-300 µs, and the per-layer path through the event loop
(compute thread -> loop -> one task per expert rank -> plane -> poll thread -> loop -> compute thread)
costs 1-2 ms per layer beyond the exchange itself. A plane whose per-layer exchange needs no event loop
(descriptor rings in shared memory, ready flags) can offer this capability; the attention executor then
runs async-mode batches on its compute thread (``attention_svc.direct_runner``) and touches the loop only
when a batch starts and ends. Planes without it (``grpc``, ``shm``, ``cuda-ipc``) and the sync modes keep
the ``DataPlane.exchange`` path.

The interface (what a plane implements to take part):

``plane.direct(top_k) -> DirectLink | None``
    On the event loop, when a batch starts: a handle for posting this batch's dispatches from the compute
    thread, bound to the link's live path (a stream, a region), or None when the plane cannot serve the
    batch this way (the executor then uses ``exchange`` for the whole batch). May raise ``Unavailable``
    (the path could not be set up).

``DirectLink.post(request, ticket)``
    On the compute thread: send ``request`` (a ``PlaneRequest``, async mode). Blocks only while every
    credit is in use (backpressure: nothing is dropped) and returns once the dispatch is on its way
    (``request.sent()`` called). The plane later settles ``ticket`` exactly once, from any thread, with
    an ``ExchangeResult`` or an ``AsapError`` (the same errors as ``exchange``: ``Unavailable`` when the
    path broke, within the plane's failure bound; the expert's in-band error; ``InvalidArgument``).
    Raises ``AsapError`` when it cannot send (the path is broken). ``ticket.cancelled`` set by the caller
    must end a blocked ``post`` promptly (``Unavailable`` raised). The caller posts a layer's dispatches
    inside ``wakes_deferred()``: a plane that wakes its peer through ``asap.dataplane.ring`` then wakes
    them all after the last post (and before any ``post`` blocks for a credit).

``DirectLink.abandon(ticket)``
    Any thread: the batch gave up on a posted dispatch (cancelled, or another dispatch of the layer
    failed). Memory the expert may still write stays reserved until its answer comes or the path ends
    (counted in ``stats.quarantined``); the ticket may still be settled later, and that is ignored.

Optional, for planes that fill a slot and publish it in two steps:

``DirectLink.arm(request, ticket) -> Armed | None``
    On the compute thread: take a slot and fill it with ``request`` as ``post`` would (blocking for a
    credit alike), without sending it; None when the link cannot (the caller then ``post``s). The
    caller sends it later with ``Armed.publish()`` (``post``'s errors, ``request.sent()`` called) or
    gives the slot back unsent with ``Armed.release()``. Why: the attention rank fills the layer's slots
    while the layer's own work still runs (``MoERequest.rest``: the emulated device's modelled time) and
    sends them the moment it ends, so that host work is off the layer's critical path.

Optional, for planes whose completions the waiting thread can take itself (sparing the hop through the
plane's poll thread, one thread wake per layer):

``DirectLink.poll()``
    Take whatever answers arrived, on the calling thread (settling their tickets); never blocks.

``DirectLink.park(on) -> Sequence[int]``
    ``on=True``: the caller is about to sleep; ask the peer to signal and return the file descriptors
    that become readable when an answer arrives (the caller ``select``s on them with its ``Wake``);
    none means "look again soon" (the caller sleeps ``SHORT_PARK_S`` at most).
    ``on=False``: it woke up. A plane's own poll thread should not park on a link while it is parked
    elsewhere (it still sweeps it), so one answer wakes one thread.

``DirectLink.park_futex(on) -> tuple[int, int] | None``
    As ``park``, for a caller that sleeps on futex words (``asap.dataplane.futex``, ``Wake.wait_words``)
    instead of file descriptors: ``on=True`` asks the peer to wake a word and returns its (address,
    value) to wait on (None: look again soon); ``on=False``: it woke up. The caller uses it only when
    every link it parks on offers it and its ``Wake`` has a word (``Wake.has_word``); otherwise ``park``.
    Why: a pipe write wakes its reader synchronously (on the writer's core, which the writer then
    yields); ``FUTEX_WAKE`` does not, and costs the writer one system call with no file behind it.

A GPU plane implements the same calls: ``post`` enqueues the rows and the ready flag on its streams
(or on the caller's current stream, which made the dispatch) and publishes the descriptor; the settled
``ExchangeResult.hidden`` must be safe to read on the compute thread's stream (as ``exchange`` requires).

Early results (a GPU plane with ``ASAP_GPU_HOST_FREE=1``): ``post`` may settle its ticket at once with a
result whose ``ready`` event passes only when the peer's device work has (``Ticket.settle_early``), so
the compute thread enqueues the combine with no host waiting for the peer's completion. The plane's
later ``settle`` is then the *verdict* (``Ticket.confirmed``, an error in ``Ticket.failure``): the
caller must not post the next layer's dispatches nor finish the batch before every verdict of the
layer came, and fails the batch on a failed one (``attention_svc.direct_runner``). So a host waits for
a verdict only where it would have waited for the answer, one layer later, and a dead peer's poison
(which releases the event) fails the batch within the plane's bound as before.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from asap.dataplane import futex
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.dataplane.ring import wakes_deferred
from asap.errors import AsapError

__all__ = ["SHORT_PARK_S", "DirectCapable", "DirectLink", "Ticket", "Wake", "wakes_deferred"]

SHORT_PARK_S = 200e-6
"""How long a waiter sleeps at most on a link that gave no file descriptor to wait on."""


_ON_PIPE = 1
_ON_WORD = 2


class Wake:
    """What a compute thread waits on: set by whoever settles one of its tickets (or cancels a batch).

    The waiter ``clear``s before it checks its tickets and then ``wait``s: a ``set`` between the two
    makes ``wait`` return at once, so no wake-up is lost. ``wait`` may also watch file descriptors (a
    plane's doorbells, ``DirectLink.park``), ``wait_words`` futex words (``DirectLink.park_futex``);
    ``set`` writes into a pipe, or wakes the waiter's own word, only while the waiter sleeps."""

    __slots__ = ("_flag", "_parked", "_read", "_word", "_write")

    def __init__(self) -> None:
        self._flag = False
        self._parked = 0
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._word = futex.Word() if futex.available() else None
        """1 while the waiter sleeps in ``wait_words`` (``set`` clears it, then wakes it)."""

    @property
    def has_word(self) -> bool:
        """Whether ``wait_words`` can be used (shared futexes work here; not ``ASAP_FAST_FUTEX=0``)."""
        return self._word is not None

    def set(self) -> None:
        self._flag = True
        parked = self._parked
        if parked == _ON_PIPE:
            with contextlib.suppress(BlockingIOError, OSError):  # full pipe: a wake-up is pending
                os.write(self._write, b"\0")
        elif parked == _ON_WORD and self._word is not None:
            self._word.value = 0  # a wait not yet entered returns at once
            futex.wake(self._word.address)

    def clear(self) -> None:
        self._flag = False

    @property
    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout_s: float, fds: Sequence[int] = ()) -> bool:
        """Sleep until ``set``, one of ``fds`` is readable (drained here) or ``timeout_s``; whether set."""
        self._parked = _ON_PIPE
        try:
            if self._flag:
                return True
            try:
                readable, _, _ = select.select([self._read, *fds], [], [], timeout_s)
            except (OSError, ValueError):  # a doorbell closed meanwhile: look again
                return self._flag
            for fd in readable:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(fd, 4096):
                        pass
            return self._flag
        finally:
            self._parked = 0

    def wait_words(self, timeout_s: float, words: Sequence[tuple[int, int]]) -> bool:
        """Sleep until ``set``, one of ``words`` ((address, value) of a futex word, ``park_futex``) no
        longer holds its value or is woken, or ``timeout_s``; whether set. Needs ``has_word``."""
        word = self._word
        if word is None:
            return self.wait(min(timeout_s, SHORT_PARK_S))
        word.value = 1
        self._parked = _ON_WORD
        try:
            if self._flag:
                return True
            addresses = [word.address, *(address for address, _ in words)]
            if not futex.wait_any(addresses, [1, *(value for _, value in words)], timeout_s):
                time.sleep(min(timeout_s, SHORT_PARK_S))  # the call failed: look again soon
            return self._flag
        finally:
            self._parked = 0

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


class Ticket:
    """One dispatch posted on the hot path; settled once by the plane (from any thread)."""

    __slots__ = (
        "cancelled",
        "confirmed",
        "done",
        "failure",
        "not_before_ns",
        "observe",
        "outcome",
        "plane_data",
        "posted_ns",
        "provisional",
        "wake",
    )

    def __init__(self, wake: Wake) -> None:
        self.wake = wake
        self.done = False
        self.outcome: ExchangeResult | AsapError | None = None
        self.cancelled = False
        """Set by the batch that gave up: a blocked ``post`` returns with ``Unavailable``."""
        self.posted_ns = 0
        """``time.monotonic_ns`` when it was posted (the combine wait starts here)."""
        self.not_before_ns = 0
        """``time.monotonic_ns`` before which the result is not to be used (an emulated transfer still
        under way: the waiter sleeps until then instead of the plane's poll thread holding it)."""
        self.plane_data: object = None
        """What the plane keeps to abandon it (a sequence number, a future)."""
        self.observe: Callable[[Ticket], None] | None = None
        """Called once when it settles, on the settling thread (the link's round-trip metrics); must
        be cheap and never raise."""
        self.provisional = False
        """Settled early (``settle_early``): the result is usable on the device once its event has
        passed, but the peer's verdict (its completion, or the link's failure) is still to come."""
        self.confirmed = False
        """A provisional ticket's verdict came (``failure`` holds it when it was an error)."""
        self.failure: AsapError | None = None
        """The error a provisional ticket was confirmed with: the batch that used the result fails."""

    @property
    def verdict_pending(self) -> bool:
        """Settled early and not confirmed yet (``settle`` confirms it)."""
        return self.provisional and not self.confirmed

    def settle_early(self, result: ExchangeResult) -> None:
        """Settle with a result whose ``ready`` event passes only once the peer's device work (or a
        poison) released it, before the peer's completion is seen: the next ``settle`` confirms it.
        A no-op if already settled. The caller serialises it with the plane's ``settle`` (the end's
        lock), so a verdict is never lost between the two."""
        if self.done:
            return
        self.provisional = True
        self.settle(result)

    def settle(self, outcome: ExchangeResult | AsapError, *, not_before_ns: int = 0) -> None:
        """The plane's answer (first one wins); wakes the waiting compute thread. On a provisional
        ticket the next call is its verdict (``confirmed``; an error is kept in ``failure``)."""
        if self.done:
            if self.provisional and not self.confirmed:
                if isinstance(outcome, AsapError):
                    self.failure = outcome
                self.confirmed = True
                if self.observe is not None:  # (the round trip ends with the verdict)
                    self.observe(self)
                self.wake.set()
            return
        self.outcome = outcome
        self.not_before_ns = not_before_ns
        self.done = True
        if self.observe is not None and not self.provisional:
            self.observe(self)
        self.wake.set()


class Armed(Protocol):
    """A dispatch in a slot, filled and not yet sent (``DirectLink.arm``)."""

    def publish(self) -> None: ...

    def release(self) -> None: ...


class DirectLink(Protocol):
    """A plane's hot-path handle for one batch (see the module doc)."""

    def post(self, request: PlaneRequest, ticket: Ticket) -> None: ...

    def abandon(self, ticket: Ticket) -> None: ...


class DirectCapable(Protocol):
    """A data plane that offers the hot path."""

    def direct(self, top_k: int) -> DirectLink | None: ...
