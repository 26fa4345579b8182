"""A single-producer single-consumer ring of fixed-size records in shared memory, and how its consumer
waits (spin, then sleeps of growing length, then a doorbell).

Why: the per-layer exchange of ranks on one host should cost what a few stores and loads cost, not what
an RPC costs (DESIGN.md §9). The producer writes a record and returns; the consumer polls at its own pace.

Layout at ``offset`` of a buffer (every field on its own 64-byte line, so the two sides never write the
same cache line):

    line 0   head      u64  records published (written by the producer)
    line 1   tail      u64  records consumed (written by the consumer): the producer's credits
    line 2   waiting   u32  the consumer is parked on the doorbell (set by the consumer)
             closed    u32  no more records will come (set by the producer, or by whoever gives up)
    line 3.. records   ``capacity`` x ``RECORD_BYTES``; each starts with its sequence number (u64,
                            position + 1), written after the rest of the record

The consumer takes the record at ``tail`` only once its sequence number says it is complete, so a record
is never read half-written; every word is stored and loaded whole (``asap.dataplane.words``: written
with ``struct``, the other process saw them torn). This relies on stores becoming visible in program
order (x86-64 TSO; an ARM port needs a release store for the sequence number and an acquire load for
the check). A full ring
refuses the record (``try_push`` returns False): the producer holds it back, nothing is dropped.

Doorbell: a named FIFO. A consumer that found nothing for a while sets ``waiting`` and blocks in
``select`` on it; a producer that sees ``waiting`` after publishing writes one byte. Each side puts a
full barrier (``full_fence``) between its store (the flag; the record) and its load (the record; the
flag), so at least one of them sees the other's store and no wake-up is lost to store-load reordering
(x86-64 TSO allows it otherwise); the park timeout then only paces the heartbeats, and a lost wake-up
(were the fence missing) would cost at most that timeout, never a record.

A ring made with ``futex_wait`` (the expert's request rings, the attention rank's completion rings)
lets its consumer park on the ``waiting`` word itself instead (``WAIT_FUTEX``, a shared futex:
``asap.dataplane.futex``); the producer (``Ring.wake``) then clears the word and wakes every thread on
it with ``FUTEX_WAKE``, an ordinary wake-up, where a pipe write is a synchronous one that made the
attention compute thread wait behind the woken poll threads. The word's bits say how the consumers wait
(``WAIT_BELL``, ``WAIT_FUTEX``; a ring with two consumers may have both), so the producer needs no
configuration. A sender of
several records in a row may hold its wake-ups back until all are published (``wakes_deferred``).
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from asap.dataplane import futex
from asap.dataplane.spin import SpinBudget
from asap.dataplane.words import load_u32, load_u64, store_u32, store_u64
from asap.emulation.clock import reduce_timer_slack
from asap.errors import InvalidArgument

__all__ = [
    "LINE",
    "RECORD_BYTES",
    "WAIT_BELL",
    "WAIT_FUTEX",
    "Backoff",
    "Doorbell",
    "Ring",
    "flush_deferred_wakes",
    "full_fence",
    "wakes_deferred",
]

LINE = 64
RECORD_BYTES = 64
"""Bytes of one record (8 of them the sequence number)."""
_HEADER = 3 * LINE
_WAITING = 2 * LINE
_CLOSED = 2 * LINE + 4
WAIT_BELL = 1
"""``waiting`` bit: a consumer sleeps on the doorbell FIFO."""
WAIT_FUTEX = 2
"""``waiting`` bit: a consumer sleeps on the word itself (a shared futex)."""


class Ring:
    """One SPSC ring over ``buf[offset:offset + Ring.nbytes(capacity)]``; one side pushes, the other pops."""

    def __init__(self, buf: memoryview, offset: int, capacity: int, *, futex_wait: bool = False) -> None:
        if capacity <= 0:
            raise InvalidArgument(f"ring capacity must be > 0, got {capacity}")
        if offset % LINE or offset + self.nbytes(capacity) > len(buf):
            raise InvalidArgument(f"ring of {capacity} records does not fit at offset {offset}")
        self._buf = buf
        self.offset = offset
        self.capacity = capacity
        self._records = offset + _HEADER
        self._head = self._load(0)  # the producer's own copy (only it writes head)
        self._tail = self._load(LINE)  # the consumer's own copy (only it writes tail)
        self.futex_wait = futex_wait and futex.available()
        """The consumer parks on the ``waiting`` word (``Backoff``), not on the doorbell."""
        self._waiting_address = 0
        with contextlib.suppress(TypeError, ValueError, BufferError):  # a read-only buffer: no futex
            self._waiting_address = futex.address_of(buf, offset + _WAITING)

    @staticmethod
    def nbytes(capacity: int) -> int:
        return _HEADER + capacity * RECORD_BYTES

    def _load(self, field: int) -> int:
        return load_u64(self._buf, self.offset + field)

    # producer side

    def try_push(self, payload: bytes) -> bool:
        """Publish one record (up to ``RECORD_BYTES - 8`` bytes); False when the ring is full."""
        if len(payload) > RECORD_BYTES - 8:
            raise InvalidArgument(f"ring record of {len(payload)} bytes (at most {RECORD_BYTES - 8})")
        head = self._head
        if head - self._load(LINE) >= self.capacity:
            return False
        at = self._records + (head % self.capacity) * RECORD_BYTES
        self._buf[at + 8 : at + 8 + len(payload)] = payload
        store_u64(self._buf, at, head + 1)  # the record is complete once its sequence number is
        self._head = head + 1
        store_u64(self._buf, self.offset, head + 1)
        return True

    @property
    def credits(self) -> int:
        """Records the producer may still publish before the consumer takes any."""
        return self.capacity - (self._head - self._load(LINE))

    @property
    def consumer_waiting(self) -> bool:
        return bool(load_u32(self._buf, self.offset + _WAITING))

    def wake(self, bell: Doorbell) -> None:
        """After publishing: wake the consumer if it is parked, the way it parked (its doorbell or its
        futex). Inside ``wakes_deferred`` on this thread, held until the block ends."""
        held: list[tuple[Ring, Doorbell]] | None = getattr(_deferred, "wakes", None)
        if held is None:
            self._wake_now(bell)
        elif not any(ring is self for ring, _ in held):
            held.append((self, bell))

    def _wake_now(self, bell: Doorbell) -> None:
        full_fence()  # the record's stores before the flag's load (see the module doc)
        state = load_u32(self._buf, self.offset + _WAITING)
        if not state:
            return
        if state & WAIT_FUTEX and self._waiting_address:
            store_u32(self._buf, self.offset + _WAITING, 0)  # a wait not yet entered returns at once
            # every thread on the word: a completion ring's two consumers may both sleep on it
            if futex.wake(self._waiting_address, futex.WAKE_ALL) >= 0 and not state & WAIT_BELL:
                return
        bell.ring()

    @property
    def waiting_address(self) -> int:
        """The address of the ``waiting`` word (0: unknown), for ``futex.wait_any``."""
        return self._waiting_address

    # consumer side

    def pop(self) -> bytes | None:
        """The next complete record (its payload, ``RECORD_BYTES - 8`` bytes), or None."""
        tail = self._tail
        at = self._records + (tail % self.capacity) * RECORD_BYTES
        if load_u64(self._buf, at) != tail + 1:
            return None
        payload = bytes(self._buf[at + 8 : at + RECORD_BYTES])
        self._tail = tail + 1
        store_u64(self._buf, self.offset + LINE, tail + 1)
        return payload

    def ready(self) -> bool:
        """Whether ``pop`` would return a record now."""
        at = self._records + (self._tail % self.capacity) * RECORD_BYTES
        return bool(load_u64(self._buf, at) == self._tail + 1)

    def set_waiting(self, waiting: bool, how: int = WAIT_BELL) -> int:
        """Say whether (and how: ``WAIT_BELL``, ``WAIT_FUTEX``) the consumer sleeps; the word written,
        which a futex wait must expect (re-reading it could see the producer's clear and sleep on it)."""
        state = how if waiting else 0
        store_u32(self._buf, self.offset + _WAITING, state)
        return state

    # either side

    def close(self) -> None:
        store_u32(self._buf, self.offset + _CLOSED, 1)

    @property
    def closed(self) -> bool:
        return bool(load_u32(self._buf, self.offset + _CLOSED))

    def release(self) -> None:
        """Forget the buffer (the mapping can then be closed)."""
        self._buf = memoryview(b"")
        self._waiting_address = 0


_FENCE = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between this thread's stores before it and its loads after it: taking and
    giving back a lock is an atomic read-modify-write (a ``lock``-prefixed instruction on x86-64), which
    no store before it passes and no load after it overtakes. ~0.1 µs; the GIL keeps it uncontended."""
    with _FENCE:
        pass


_deferred = threading.local()


@contextlib.contextmanager
def wakes_deferred() -> Iterator[None]:
    """Hold this thread's consumer wake-ups (``Ring.wake``) until the block ends, then give them, one per
    ring. A sender posting one record per peer (the attention compute thread, one dispatch per expert
    rank of a layer) publishes them all before it wakes anyone, so no woken peer delays the next post.
    Nested blocks join the outer one."""
    if getattr(_deferred, "wakes", None) is not None:
        yield
        return
    _deferred.wakes = []
    try:
        yield
    finally:
        flush_deferred_wakes()
        _deferred.wakes = None


def flush_deferred_wakes() -> None:
    """Give this thread's held wake-ups now (a sender about to block, e.g. for a credit: a peer it has
    not woken yet may be the one that frees it). The block goes on holding later ones."""
    held: list[tuple[Ring, Doorbell]] | None = getattr(_deferred, "wakes", None)
    if not held:
        return
    _deferred.wakes = []
    for ring, bell in held:
        with contextlib.suppress(ValueError, IndexError, TypeError, struct.error):  # retired meanwhile
            ring._wake_now(bell)


class Doorbell:
    """A named FIFO that wakes a parked consumer. ``create`` makes the path; every user ``open``s it
    (read-write, non-blocking, so no side ever blocks on open or on a full pipe)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    @classmethod
    def create(cls, path: str) -> Doorbell:
        os.mkfifo(path, 0o600)
        return cls(path)

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._fd, 4096):
                pass

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Backoff:
    """How a poll thread waits when it found nothing: spin for ``spin_s``, then wait on the doorbells
    (``select``) with timeouts growing from ``first_sleep_s`` to ``park_s``. Spinning keeps back-to-back
    records at a few µs; past it the producer rings (the ``waiting`` flag), so the wake latency is the
    kernel's wake-up, whatever the timeout, and an idle rank stays off the CPU. The timeout only bounds
    a wake-up lost to the flag race (``full_fence`` closes it) and paces the heartbeats. ``reset``
    after work.

    ``spin`` (a ``SpinBudget``): at the first look of each idle gap, spin on the rings' records for
    the budget before parking (the cross-core wake-up off the critical path when the next record is
    due soon); every gap that idled is observed, from ``reset`` to the end of the last ``idle`` before
    the next ``reset`` (the look that found the record, not the work done on it)."""

    def __init__(
        self,
        *,
        spin_s: float = 0.0,
        first_sleep_s: float = 50e-6,
        park_s: float = 5e-3,
        clock: Callable[[], float] = time.perf_counter,
        spin: SpinBudget | None = None,
    ) -> None:
        self.spin_s = spin_s
        self.spin = spin
        self._idled = False
        self._looked = 0.0  # when the last ``idle`` ended (the end of a gap that idled)
        self.first_sleep_s = first_sleep_s
        self.park_s = park_s
        self._clock = clock
        self._idle_since = clock()
        self._sleep_s = first_sleep_s
        self.parks = 0
        """Times the thread waited on the doorbells (for tests and benchmarks)."""

    def reset(self) -> None:
        if self._idled and self.spin is not None:  # the gap: until the look that ended it, not now
            self.spin.observe(self._looked - self._idle_since)
        self._idled = False
        self._idle_since = self._clock()
        self._sleep_s = self.first_sleep_s

    def idle(self, rings: Sequence[Ring], bells: Sequence[Doorbell]) -> None:
        """Wait a little for a record on one of ``rings`` (the consumer's), according to the idle time."""
        if self._clock() - self._idle_since < self.spin_s:
            return
        first, self._idled = not self._idled, True
        spin = self.spin if first and rings else None
        try:
            if spin is not None and spin.spin(lambda: any(ring.ready() for ring in rings), len(rings)):
                return
            self._park(rings, bells)
        finally:
            self._looked = self._clock()

    def _park(self, rings: Sequence[Ring], bells: Sequence[Doorbell]) -> None:
        if not bells:
            reduce_timer_slack()
            time.sleep(self._sleep_s)
            self._sleep_s = min(self._sleep_s * 2, self.park_s)
            return
        on_futex = all(ring.futex_wait and ring.waiting_address for ring in rings)
        how = WAIT_FUTEX if on_futex else WAIT_BELL
        states = [ring.set_waiting(True, how) for ring in rings]
        full_fence()  # the flags' stores before the records' loads (see the module doc)
        try:
            if any(ring.ready() for ring in rings):  # published before the flag was seen: no wake comes
                return
            self.parks += 1
            if on_futex:
                if not futex.wait_any([ring.waiting_address for ring in rings], states, self._sleep_s):
                    time.sleep(self._sleep_s)  # the call failed: sleep the timeout instead
            else:
                woken, _, _ = select.select(bells, [], [], self._sleep_s)
                for bell in woken:
                    bell.drain()
            self._sleep_s = min(self._sleep_s * 2, self.park_s)
        finally:
            for ring in rings:
                ring.set_waiting(False, how)
