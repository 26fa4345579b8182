"""The SPSC descriptor ring: order, backpressure (a full ring refuses, nothing is lost), records never
read half-written, the doorbell wakes a parked consumer, and two processes exchanging through it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from asap.dataplane.ring import RECORD_BYTES, Backoff, Doorbell, Ring
from asap.dataplane.shm import ShmRegion, region_name
from asap.errors import InvalidArgument


def _ring(capacity: int = 4) -> Ring:
    buf = memoryview(bytearray(Ring.nbytes(capacity)))
    return Ring(buf, 0, capacity)


def test_records_come_out_in_order() -> None:
    ring = _ring(4)
    for round_ in range(5):  # wraps around several times
        for i in range(3):
            assert ring.try_push(bytes([round_, i]))
        got = [ring.pop() for _ in range(3)]
        assert [g[:2] for g in got if g is not None] == [bytes([round_, i]) for i in range(3)]
        assert ring.pop() is None


def test_full_ring_refuses_and_loses_nothing() -> None:
    ring = _ring(2)
    assert ring.try_push(b"a") and ring.try_push(b"b")
    assert ring.credits == 0
    assert not ring.try_push(b"c")  # held back by the sender, not dropped or overwritten
    assert ring.pop()[:1] == b"a"  # type: ignore[index]
    assert ring.credits == 1
    assert ring.try_push(b"c")
    assert [ring.pop()[:1], ring.pop()[:1]] == [b"b", b"c"]  # type: ignore[index]
    assert ring.pop() is None


def test_half_written_record_is_not_taken() -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    producer, consumer = Ring(buf, 0, 2), Ring(buf, 0, 2)
    at = 3 * 64  # first record: payload written, sequence number not yet
    buf[at + 8 : at + 10] = b"xx"
    assert not consumer.ready() and consumer.pop() is None
    assert producer.try_push(b"ok")
    assert consumer.pop()[:2] == b"ok"  # type: ignore[index]


def test_bad_geometry_and_oversized_record() -> None:
    with pytest.raises(InvalidArgument):
        Ring(memoryview(bytearray(64)), 0, 4)
    with pytest.raises(InvalidArgument):
        _ring(2).try_push(b"x" * RECORD_BYTES)


def test_closed_flag_is_seen_by_both_sides() -> None:
    buf = memoryview(bytearray(Ring.nbytes(2)))
    a, b = Ring(buf, 0, 2), Ring(buf, 0, 2)
    assert not b.closed
    a.close()
    assert b.closed


def test_parked_consumer_is_woken_by_the_doorbell() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bell = Doorbell.create(os.path.join(tmp, "bell"))
        buf = memoryview(bytearray(Ring.nbytes(2)))
        producer, consumer = Ring(buf, 0, 2), Ring(buf, 0, 2)
        backoff = Backoff(spin_s=0, first_sleep_s=30.0, park_s=30.0)
        got: list[bytes] = []

        def consume() -> None:
            while not got:
                record = consumer.pop()
                if record is None:
                    backoff.idle([consumer], [bell])
                else:
                    got.append(record[:2])

        thread = threading.Thread(target=consume)
        thread.start()
        while not producer.consumer_waiting:  # the consumer parked (30 s park: only the bell wakes it)
            threading.Event().wait(0.001)
        assert producer.try_push(b"hi")
        bell.ring()
        thread.join(timeout=10)
        assert not thread.is_alive() and got == [b"hi"] and backoff.parks >= 1
        bell.close()
        bell.unlink()


_ECHO = """
import sys
from asap.dataplane.ring import Ring
from asap.dataplane.shm import ShmRegion
region = ShmRegion.attach(sys.argv[1])
buf = region._buf()
requests, replies = Ring(buf, 0, 2), Ring(buf, Ring.nbytes(2), 2)
n = 0
while n < int(sys.argv[2]):
    record = requests.pop()
    if record is None:
        continue
    while not replies.try_push(record[:8][::-1]):
        pass
    n += 1
requests.release(); replies.release()
region.close()
"""


def test_two_processes_exchange_through_the_ring(tmp_path: Path) -> None:
    count = 200
    region = ShmRegion.create(region_name(0, 0), 2 * Ring.nbytes(2))
    try:
        buf = region._buf()
        requests, replies = Ring(buf, 0, 2), Ring(buf, Ring.nbytes(2), 2)
        peer = subprocess.Popen([sys.executable, "-c", _ECHO, region.name, str(count)])
        sent = received = 0
        answers = []
        while received < count:  # a ring of 2 records: the sender is held back most of the time
            if sent < count and requests.try_push(sent.to_bytes(8, "big")):
                sent += 1
            reply = replies.pop()
            if reply is not None:
                answers.append(int.from_bytes(reply[:8], "little"))
                received += 1
        assert peer.wait(timeout=60) == 0
        assert answers == list(range(count))  # every record once, in order
        requests.release()
        replies.release()
    finally:
        region.destroy()
