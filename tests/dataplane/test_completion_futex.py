"""The completion direction (expert -> attention) on futex words: the attention compute thread sleeps in
``Wake.wait_words`` on its own word and the completion rings' ``waiting`` words; the expert's
``Ring.wake`` clears a word and wakes every thread on it (the poll thread may sleep on it too), a
consumer on the doorbell is still rung, and ``Wake.set`` from another thread ends the wait. Nothing is
lost: the record is there when the waiter wakes. Without futexes (``Wake.has_word`` False) the waiter
uses the pipe and the doorbells, as before."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator

import pytest

from asap.dataplane import futex
from asap.dataplane.direct import Wake
from asap.dataplane.fast_region import SharedWaitRing
from asap.dataplane.ring import WAIT_BELL, WAIT_FUTEX, Backoff, Doorbell, Ring
from asap.dataplane.shm import ShmRegion, region_name

needs_futex = pytest.mark.skipif(not futex.available(), reason="no shared futexes here")


@pytest.fixture
def bell() -> Iterator[Doorbell]:
    with tempfile.TemporaryDirectory() as tmp:
        bell = Doorbell.create(os.path.join(tmp, "bell"))
        yield bell
        bell.close()
        bell.unlink()


@pytest.fixture
def rings() -> Iterator[tuple[SharedWaitRing, Ring]]:
    """The attention side's completion ring and the expert's view of it, in two mappings of one region."""
    region = ShmRegion.create(region_name(0, 0), Ring.nbytes(4))
    peer = ShmRegion.attach(region.name)
    consumer = SharedWaitRing(region._buf(), 0, 4)
    producer = Ring(peer._buf(), 0, 4)
    try:
        yield consumer, producer
    finally:
        consumer.release()
        producer.release()
        peer.close()
        region.destroy()


def _has_bytes(bell: Doorbell) -> bool:
    try:
        return bool(os.read(bell.fileno(), 4096))
    except BlockingIOError:
        return False


def _until(condition: object) -> None:
    while not condition():  # type: ignore[operator]
        threading.Event().wait(0.001)


@needs_futex
def test_a_compute_thread_parked_on_the_word_is_woken_by_the_expert(
    rings: tuple[SharedWaitRing, Ring], bell: Doorbell
) -> None:
    consumer, producer = rings
    wake = Wake()
    assert wake.has_word and consumer.futex_wait
    returned: list[bool] = []

    def compute_thread() -> None:
        state = consumer.set_waiting(True, WAIT_FUTEX)
        try:
            if not consumer.ready():
                returned.append(wake.wait_words(30.0, [(consumer.waiting_address, state)]))
        finally:
            consumer.set_waiting(False, WAIT_FUTEX)

    thread = threading.Thread(target=compute_thread)
    thread.start()
    _until(lambda: producer.consumer_waiting)
    assert producer.try_push(b"done")
    producer.wake(bell)
    thread.join(timeout=10)
    assert not thread.is_alive() and returned == [False]  # woken by the word, not by ``set``
    assert consumer.pop() is not None  # nothing lost
    assert not _has_bytes(bell)  # no pipe written
    assert not producer.consumer_waiting
    wake.close()


@needs_futex
def test_set_from_another_thread_ends_a_wait_on_words(rings: tuple[SharedWaitRing, Ring]) -> None:
    consumer, _ = rings
    wake = Wake()
    wake.set()
    assert wake.wait_words(30.0, [])  # set before the wait: at once
    wake.clear()
    state = consumer.set_waiting(True, WAIT_FUTEX)
    threading.Timer(0.01, wake.set).start()
    assert wake.wait_words(30.0, [(consumer.waiting_address, state)])  # the poll thread settled a ticket
    consumer.set_waiting(False, WAIT_FUTEX)
    wake.clear()
    assert not wake.wait_words(0.01, [(consumer.waiting_address, WAIT_FUTEX)])  # word differs: at once
    wake.close()


@needs_futex
def test_both_consumers_on_the_word_are_woken_by_one_wake(
    rings: tuple[SharedWaitRing, Ring], bell: Doorbell
) -> None:
    """The poll thread (``Backoff`` on the futex) and a compute thread sleep on the same word: one
    ``Ring.wake`` wakes both (a wake of one would leave the other to its timeout)."""
    consumer, producer = rings
    wake = Wake()
    backoff = Backoff(spin_s=0, first_sleep_s=30.0, park_s=30.0)
    ended: list[str] = []

    def poll_thread() -> None:
        backoff.idle([consumer], [bell])
        ended.append("poll")

    def compute_thread() -> None:
        state = consumer.set_waiting(True, WAIT_FUTEX)
        try:
            wake.wait_words(30.0, [(consumer.waiting_address, state)])
        finally:
            consumer.set_waiting(False, WAIT_FUTEX)
        ended.append("compute")

    threads = [threading.Thread(target=poll_thread), threading.Thread(target=compute_thread)]
    for thread in threads:
        thread.start()
    _until(lambda: consumer._parked[WAIT_FUTEX] == 2 and backoff.parks == 1)
    threading.Event().wait(0.05)  # both inside their waits (a wait not yet entered returns at once anyway)
    assert producer.try_push(b"done")
    producer.wake(bell)
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(ended) == ["compute", "poll"]
    assert consumer.pop() is not None and not _has_bytes(bell)
    wake.close()


def test_the_word_holds_the_bit_of_every_way_its_consumers_sleep(rings: tuple[SharedWaitRing, Ring]) -> None:
    consumer, producer = rings
    assert consumer.set_waiting(True, WAIT_BELL) == WAIT_BELL
    assert consumer.set_waiting(True, WAIT_FUTEX) == WAIT_BELL | WAIT_FUTEX
    assert consumer.set_waiting(True, WAIT_FUTEX) == WAIT_BELL | WAIT_FUTEX
    assert consumer.set_waiting(False, WAIT_BELL) == WAIT_FUTEX  # one bell sleeper gone
    assert consumer.set_waiting(False, WAIT_FUTEX) == WAIT_FUTEX  # one of the two futex sleepers left
    assert consumer.set_waiting(False, WAIT_FUTEX) == 0
    assert not producer.consumer_waiting


def test_a_doorbell_sleeper_beside_a_futex_sleeper_is_rung(
    rings: tuple[SharedWaitRing, Ring], bell: Doorbell
) -> None:
    """Mixed ways (one consumer on the doorbell, one on the word): the producer wakes the word and
    rings the doorbell too."""
    consumer, producer = rings
    consumer.set_waiting(True, WAIT_BELL)
    consumer.set_waiting(True, WAIT_FUTEX)
    assert producer.try_push(b"done")
    producer.wake(bell)
    assert _has_bytes(bell)
    assert not producer.consumer_waiting  # the word was cleared for the futex sleeper


def test_without_futexes_the_wake_falls_back_to_its_pipe(bell: Doorbell) -> None:
    """``ASAP_FAST_FUTEX=0`` (or no system calls): no word, ``wait_words`` is not offered to callers
    (``has_word`` False), a consumer's doorbell park is rung as before, and ``set`` still wakes."""
    wake = Wake()
    wake._word = None  # what a process without shared futexes gets
    assert not wake.has_word
    threading.Timer(0.01, wake.set).start()
    assert wake.wait(30.0, [bell.fileno()])  # the pipe path
    wake.clear()
    buf = memoryview(bytearray(Ring.nbytes(2)))
    consumer, producer = Ring(buf, 0, 2), Ring(buf, 0, 2)
    consumer.set_waiting(True, WAIT_BELL)
    assert producer.try_push(b"done")
    producer.wake(bell)
    assert _has_bytes(bell)
    assert not wake.wait(0.0, [])
    wake.close()
