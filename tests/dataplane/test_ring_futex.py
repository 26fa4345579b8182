"""How a ring's consumer is woken: a ring made with ``futex_wait`` parks its consumer on the ``waiting``
word (a shared futex, keyed by the page, so two mappings of one region see the same word) and the
producer's ``wake`` wakes it there; a consumer parked on the doorbell is still rung; ``wakes_deferred``
holds a thread's wake-ups until its block ends (or until it would block for a credit), one per ring."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator

import pytest

from asap.dataplane import futex
from asap.dataplane.ring import (
    WAIT_BELL,
    WAIT_FUTEX,
    Backoff,
    Doorbell,
    Ring,
    flush_deferred_wakes,
    wakes_deferred,
)
from asap.dataplane.shm import ShmRegion, region_name

needs_futex = pytest.mark.skipif(not futex.available(), reason="no shared futexes here")


@pytest.fixture
def bell() -> Iterator[Doorbell]:
    with tempfile.TemporaryDirectory() as tmp:
        bell = Doorbell.create(os.path.join(tmp, "bell"))
        yield bell
        bell.close()
        bell.unlink()


def _consume_one(consumer: Ring, bell: Doorbell, backoff: Backoff, got: list[bytes]) -> threading.Thread:
    def consume() -> None:
        while not got:
            record = consumer.pop()
            if record is None:
                backoff.idle([consumer], [bell])
            else:
                got.append(record[:2])

    thread = threading.Thread(target=consume)
    thread.start()
    return thread


def _wait_parked(ring: Ring) -> None:
    while not ring.consumer_waiting:
        threading.Event().wait(0.001)


@needs_futex
def test_a_futex_consumer_in_another_mapping_is_woken_by_wake(bell: Doorbell) -> None:
    region = ShmRegion.create(region_name(0, 0), Ring.nbytes(2))
    peer = ShmRegion.attach(region.name)  # a second mapping: another address, the same page
    try:
        producer = Ring(region._buf(), 0, 2)
        consumer = Ring(peer._buf(), 0, 2, futex_wait=True)
        assert producer.waiting_address != consumer.waiting_address
        backoff = Backoff(spin_s=0, first_sleep_s=30.0, park_s=30.0)  # only a wake-up ends the park
        got: list[bytes] = []
        thread = _consume_one(consumer, bell, backoff, got)
        _wait_parked(producer)
        assert producer.consumer_waiting and not bell_has_bytes(bell)
        assert producer.try_push(b"hi")
        producer.wake(bell)
        thread.join(timeout=10)
        assert not thread.is_alive() and got == [b"hi"] and backoff.parks >= 1
        assert not bell_has_bytes(bell)  # woken on the word: the FIFO was not written
        assert not producer.consumer_waiting
        producer.release()
        consumer.release()
    finally:
        peer.close()
        region.destroy()


def bell_has_bytes(bell: Doorbell) -> bool:
    try:
        data = os.read(bell.fileno(), 4096)
    except BlockingIOError:
        return False
    return bool(data)


def test_a_consumer_parked_on_the_doorbell_is_rung_by_wake(bell: Doorbell) -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    producer, consumer = Ring(buf, 0, 2), Ring(buf, 0, 2)  # no futex_wait: the doorbell
    backoff = Backoff(spin_s=0, first_sleep_s=30.0, park_s=30.0)
    got: list[bytes] = []
    thread = _consume_one(consumer, bell, backoff, got)
    _wait_parked(producer)
    assert producer.try_push(b"ok")
    producer.wake(bell)
    thread.join(timeout=10)
    assert not thread.is_alive() and got == [b"ok"]


def test_wake_of_a_consumer_that_is_not_parked_does_nothing(bell: Doorbell) -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    producer = Ring(buf, 0, 2)
    producer.wake(bell)
    assert not bell_has_bytes(bell)


def test_waiting_word_says_how_the_consumer_waits() -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    ring = Ring(buf, 0, 2)
    ring.set_waiting(True)
    assert int.from_bytes(buf[128:132], "little") == WAIT_BELL
    ring.set_waiting(True, WAIT_FUTEX)
    assert int.from_bytes(buf[128:132], "little") == WAIT_FUTEX
    ring.set_waiting(False)
    assert not ring.consumer_waiting


def test_deferred_wakes_are_given_once_per_ring_when_the_block_ends(bell: Doorbell) -> None:
    buf = memoryview(bytearray(2 * Ring.nbytes(2)))
    a, b = Ring(buf, 0, 2), Ring(buf, Ring.nbytes(2), 2)
    given: list[Ring] = []
    for ring in (a, b):
        ring._wake_now = lambda _bell, ring=ring: given.append(ring)  # type: ignore[method-assign]
    with wakes_deferred():
        a.wake(bell)
        a.wake(bell)
        with wakes_deferred():  # nested: joins the outer block
            b.wake(bell)
        assert given == []
    assert given == [a, b]
    a.wake(bell)  # outside a block: at once
    assert given == [a, b, a]


def test_deferred_wakes_flushed_before_blocking_and_on_error(bell: Doorbell) -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    ring = Ring(buf, 0, 2)
    given: list[int] = []
    ring._wake_now = lambda _bell: given.append(1)  # type: ignore[method-assign]
    with wakes_deferred():
        ring.wake(bell)
        flush_deferred_wakes()  # a sender about to wait for a credit
        assert given == [1]
        ring.wake(bell)  # still held: the block goes on
        assert given == [1]
    assert given == [1, 1]
    with pytest.raises(RuntimeError), wakes_deferred():
        ring.wake(bell)
        raise RuntimeError("a post failed")
    assert given == [1, 1, 1]


def test_a_real_futex_wake_outside_a_parked_wait_is_harmless() -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    ring = Ring(buf, 0, 2, futex_wait=True)
    if ring.waiting_address:
        assert futex.wake(ring.waiting_address) in (0, -1)  # nobody waits: nobody woken
    assert futex.wait_any([], WAIT_FUTEX, 0.0) is False


@needs_futex
def test_wait_any_reuses_its_arguments_and_still_waits_and_wakes() -> None:
    """``futex.wait_any`` builds its ctypes arguments once per (words, value): a repeated wait on the
    same words reuses them, a wait for another value gets its own, and both still return at once when
    the word differs, time out when nothing wakes them, and wake on ``futex.wake``."""
    import ctypes
    import time

    word = ctypes.c_uint32(0)
    address = ctypes.addressof(word)
    assert futex.wait_any([address], 1, 1.0)  # the word is 0, not 1: returns at once (EAGAIN)
    first = futex._waits[((address,), 1)]
    assert futex.wait_any([address], 1, 1.0)
    assert futex._waits[((address,), 1)] is first
    word.value = 1
    started = time.monotonic()
    assert futex.wait_any([address], 1, 0.02)  # times out: nothing wakes it
    assert time.monotonic() - started >= 0.015
    assert futex._waits[((address,), 1)] is first
    woken = threading.Event()

    def waiter() -> None:
        futex.wait_any([address], 1, 30.0)
        woken.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    while not woken.is_set():  # the wake may come before the wait is entered: wake until it returns
        futex.wake(address)
        woken.wait(0.01)
    thread.join()
    word.value = 2
    assert futex.wait_any([address], 1, 1.0)  # 2, not 1: at once
    assert futex.wait_any([address], 3, 1.0)  # another value: its own arguments, still at once
    assert futex._waits[((address,), 3)] is not first


@needs_futex
def test_wait_any_argument_cache_is_bounded() -> None:
    import ctypes

    words = [ctypes.c_uint32(0) for _ in range(300)]
    for word in words:
        assert futex.wait_any([ctypes.addressof(word)], 1, 1.0)
    assert len(futex._waits) <= 256
