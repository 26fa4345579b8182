"""One poll thread per process side, serving the rings of every fast link it holds.

Why one thread and not one per link: an attention rank holds a link per expert rank and an expert rank a
link per attention rank; on a host with few cores each polling thread costs CPU, so one thread sweeps
all of them and parks on all their doorbells at once (``asap.dataplane.ring.Backoff``). Endpoints are
added and removed from any thread; ``remove`` returns only once the thread no longer touches the
endpoint, so its memory may then be unmapped.

An endpoint may be waited on by another thread too (the attention compute thread on the hot path,
``asap.dataplane.direct``: it takes its own results and sleeps on the endpoint's doorbell or futex
word). While its ``park_here`` is False the poll thread still sweeps and ticks it but does not park on
it, so one answer wakes one thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from asap.dataplane.ring import Backoff, Doorbell, Ring
from asap.dataplane.spin import SpinBudget

__all__ = [
    "DOORBELL_FIRST_SLEEP_S",
    "DOORBELL_PARK_S",
    "Endpoint",
    "HeldUntil",
    "OnePerProcess",
    "PollThread",
    "Polled",
    "Sweeper",
    "doorbell_backoff",
    "drain",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TICK_NS = 1_000_000
"""How often endpoints get ``tick`` (heartbeats, peer checks): every millisecond at most, and at least
once per park (``Backoff.park_s``)."""


DOORBELL_FIRST_SLEEP_S = 5e-3
"""The first park timeout of a CPU fast link's poll thread. Its peers wake a parked consumer (doorbell
or futex word, with a fence on both sides: ``asap.dataplane.ring``), so the timeout only paces the
heartbeat (peers time out after seconds) and bounds a wake-up lost were the fence missing. Every
timeout costs a sweep and a park (~0.1 ms CPU on the 2-core host): park timeouts starting at 50 µs woke
each poll thread five or six times in the ~1 ms between two layers (~15% of the attention process's CPU
per layer), and at 1 ms an expert rank of 4+4, with a request every ~5 ms, still parked ~3 times per
request (``benchmarks/layer_profile.py``)."""
DOORBELL_PARK_S = 10e-3
"""The longest park of a CPU fast link's poll thread (the doubling stops here): heartbeats at least this
often, and ``Sweeper.remove`` waits at most two of them."""


def doorbell_backoff(*, spin: bool = False) -> Backoff:
    """How a CPU fast link's poll thread waits: parks on the doorbells from ``DOORBELL_FIRST_SLEEP_S``
    to ``DOORBELL_PARK_S``; with ``spin``, first a bounded adaptive spin (``asap.dataplane.spin``) when
    the next record is due soon and the cores allow it: only for a thread that is its process's hot
    path (an emulated expert rank's, which computes inline), never one that would hold the GIL from a
    compute thread."""
    budget = SpinBudget() if spin else None
    return Backoff(first_sleep_s=DOORBELL_FIRST_SLEEP_S, park_s=DOORBELL_PARK_S, spin=budget)


class Endpoint(Protocol):
    """One link end a poll thread serves."""

    @property
    def inbound(self) -> Ring:
        """The ring this side consumes (the thread parks on it)."""
        ...

    @property
    def bell(self) -> Doorbell:
        """The doorbell of ``inbound``."""
        ...

    def poll(self, now_ns: int) -> bool:
        """Take what arrived; True if anything did."""
        ...

    def tick(self, now_ns: int) -> None:
        """Write this side's heartbeat and check the peer's."""
        ...


def drain(ring: Ring, take: Callable[[bytes], None]) -> bool:
    """Hand every record waiting in ``ring`` to ``take``, oldest first; True if there was any."""
    worked = False
    while (raw := ring.pop()) is not None:
        worked = True
        take(raw)
    return worked


class OnePerProcess(Generic[T]):
    """A process's one instance of something (its poll thread of one kind), made on first use from any
    thread."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value


class HeldUntil(Generic[T]):
    """Items an endpoint holds until their due time (an emulated link charge, taken by timestamps instead
    of event-loop sleeps), released by the poll thread's sweeps. Not locked: guard it with the
    endpoint's own lock where other threads touch it."""

    def __init__(self, due_ns: Callable[[T], int]) -> None:
        self._due_ns = due_ns
        self._items: list[T] = []

    def __len__(self) -> int:
        return len(self._items)

    def hold(self, item: T) -> None:
        self._items.append(item)

    def release(self, now_ns: int) -> list[T]:
        """The items due at ``now_ns``, in the order they were held; the rest stay held."""
        due = [item for item in self._items if self._due_ns(item) <= now_ns]
        if due:
            self._items = [item for item in self._items if self._due_ns(item) > now_ns]
        return due

    def clear(self) -> None:
        self._items = []


class Polled(Protocol):
    """What a ``Sweeper`` serves."""

    def poll(self, now_ns: int) -> bool: ...


P = TypeVar("P", bound=Polled)


class Sweeper(Generic[P]):
    """A daemon thread that sweeps its endpoints (``_run``, the subclass's loop): adding and removing
    them from any thread, the sweep count ``remove`` waits on, and one sweep's polls and ``flush`` (run
    after every sweep that found work)."""

    link = "fast"
    """How log lines name the links (``fast``, ``NIXL``)."""

    def __init__(self, name: str, *, flush: Callable[[], None] | None = None) -> None:
        self.name = name
        self._flush = flush
        self._endpoints: tuple[P, ...] = ()
        self._lock = threading.Lock()
        self._sweeps = 0
        self._swept = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def endpoints(self) -> Sequence[P]:
        return self._endpoints

    def add(self, endpoint: P) -> None:
        with self._lock:
            self._endpoints = (*self._endpoints, endpoint)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def remove(self, endpoint: P) -> None:
        """Stop serving ``endpoint``; returns once the thread has left it (at most one sweep or park)."""
        with self._lock:
            if endpoint not in self._endpoints:
                return
            self._endpoints = tuple(e for e in self._endpoints if e is not endpoint)
            if (
                self._thread is None
                or self._thread is threading.current_thread()
                or not self._thread.is_alive()
            ):
                return
            target = self._sweeps + 2  # the sweep under way may still hold it; the next one cannot
            while self._sweeps < target and self._thread.is_alive():
                self._swept.wait(timeout=0.1)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _poll(self, endpoints: Sequence[P], now: int) -> bool:
        """Poll every endpoint, then ``flush`` if any found work; True if one did."""
        worked = False
        for endpoint in endpoints:
            try:
                worked = endpoint.poll(now) or worked
            except Exception:  # one broken link must not stop the others
                logger.exception("%s: polling a %s link failed", self.name, self.link)
        if worked and self._flush is not None:
            try:
                self._flush()
            except Exception:
                logger.exception("%s: handing work on failed", self.name)
        return worked

    def _count_sweep(self) -> None:
        with self._lock:
            self._sweeps += 1
            self._swept.notify_all()

    def _run(self) -> None:
        raise NotImplementedError


class PollThread(Sweeper[Endpoint]):
    """A daemon thread that polls its endpoints, ticks them and parks on their doorbells."""

    def __init__(
        self,
        name: str,
        *,
        flush: Callable[[], None] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        super().__init__(name, flush=flush)
        self._backoff = backoff()

    def _run(self) -> None:
        backoff = self._backoff
        last_tick = 0
        while not self._stopped:
            endpoints = self._endpoints
            now = time.monotonic_ns()
            worked = self._poll(endpoints, now)
            if now - last_tick >= TICK_NS:
                last_tick = now
                for endpoint in endpoints:
                    try:
                        endpoint.tick(now)
                    except Exception:
                        logger.exception("%s: heartbeat of a fast link failed", self.name)
            self._count_sweep()
            endpoints = self._endpoints  # a tick may have removed some (a retired region)
            if worked:
                backoff.reset()
            elif endpoints:
                parkable = [e for e in endpoints if getattr(e, "park_here", True)]
                try:
                    backoff.idle([e.inbound for e in parkable], [e.bell for e in parkable])
                except (OSError, TypeError, ValueError, IndexError):  # closed meanwhile: sweep again
                    time.sleep(backoff.first_sleep_s)
            else:
                time.sleep(backoff.park_s)
