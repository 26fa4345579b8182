"""Words of shared memory stored by one process and loaded by another are never seen torn: the
heartbeat words and the ring's indices (``asap.dataplane.words``). Before, ``struct.pack_into`` zeroed a
word before writing it byte by byte, and a reader in the other process saw 0 or a mix of old and new."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asap.dataplane.fastlink import HEARTBEAT_EXPERT, beat, heartbeat
from asap.dataplane.ring import Ring
from asap.dataplane.shm import ShmRegion, region_name
from asap.dataplane.words import load_u32, load_u64, store_u32, store_u64

_BASE = 1 << 60
"""Every heartbeat the peer writes is above this: a load below it is torn (or the word read as 0)."""

_BEATER = """
import sys
from asap.dataplane.fastlink import HEARTBEAT_EXPERT, beat
from asap.dataplane.shm import ShmRegion
region = ShmRegion.attach(sys.argv[1])
buf = region._buf()
base, count = int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
for i in range(count):
    beat(buf, HEARTBEAT_EXPERT, base + i)
print("done", flush=True)
del buf
region.close()
"""


def test_a_heartbeat_rewritten_by_another_process_never_reads_torn() -> None:
    region = ShmRegion.create(region_name(90, 90), 4096)
    try:
        buf = region._buf()
        beat(buf, HEARTBEAT_EXPERT, _BASE)
        peer = subprocess.Popen(
            [sys.executable, "-c", _BEATER, region.name, str(_BASE), "200000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert peer.stdout is not None and peer.stdout.readline() == "ready\n"
        loads = torn = 0
        last = _BASE
        while peer.poll() is None:  # load as often as we can while the peer rewrites the word
            for _ in range(1000):
                value = heartbeat(buf, HEARTBEAT_EXPERT)
                loads += 1
                if value < last:  # a word only grows: anything smaller (0 included) is torn
                    torn += 1
                else:
                    last = value
        assert peer.wait(timeout=60) == 0 and peer.stdout.read() == "done\n"
        peer.stdout.close()
        assert torn == 0, f"{torn} of {loads} heartbeat loads were torn"
        assert heartbeat(buf, HEARTBEAT_EXPERT) == _BASE + 199999
        del buf
    finally:
        region.destroy()


_CONSUMER = """
import sys
from asap.dataplane.ring import Ring
from asap.dataplane.shm import ShmRegion
region = ShmRegion.attach(sys.argv[1])
buf = region._buf()
ring = Ring(buf, 0, int(sys.argv[2]))
n = 0
while n < int(sys.argv[3]):
    if ring.pop() is not None:
        n += 1
ring.release()
del buf
region.close()
"""


def test_the_producer_never_reads_a_torn_tail() -> None:
    capacity, count = 4, 20000
    region = ShmRegion.create(region_name(91, 91), Ring.nbytes(capacity))
    try:
        buf = region._buf()
        ring = Ring(buf, 0, capacity)
        peer = subprocess.Popen([sys.executable, "-c", _CONSUMER, region.name, str(capacity), str(count)])
        sent = 0
        bad_credits = []
        while sent < count:
            credits = ring.credits  # loads the consumer's tail while the consumer stores it
            if not 0 <= credits <= capacity:
                bad_credits.append(credits)
            if ring.try_push(sent.to_bytes(8, "little")):
                sent += 1
        assert peer.wait(timeout=60) == 0
        assert bad_credits == [], f"credits outside [0, {capacity}]: {bad_credits[:5]}"
        assert ring.credits == capacity  # every record taken
        ring.release()
        del buf
    finally:
        region.destroy()


def test_words_store_and_load_whole_and_refuse_unaligned_offsets() -> None:
    buf = memoryview(bytearray(64))
    store_u64(buf, 8, 2**64 - 2)
    assert load_u64(buf, 8) == 2**64 - 2 and int.from_bytes(buf[8:16], sys.byteorder) == 2**64 - 2
    store_u32(buf, 4, 3)
    assert load_u32(buf, 4) == 3 and int.from_bytes(buf[4:8], sys.byteorder) == 3
    assert load_u64(buf, 0) == 3 << 32  # the neighbours untouched
    for bad in (lambda: load_u64(buf, 4), lambda: store_u32(buf, 2, 1)):
        with pytest.raises(ValueError, match="unaligned"):
            bad()
    with pytest.raises(IndexError):  # a mapping let go (the buffer replaced by an empty one)
        load_u64(memoryview(b""), 0)


def test_a_ring_does_not_pin_its_mapping() -> None:
    """A ring still referenced when its region is closed holds no view of it (closing would fail)."""
    region = ShmRegion.create(region_name(92, 92), Ring.nbytes(2))
    buf = region._buf()
    ring = Ring(buf, 0, 2)
    assert ring.try_push(b"x") and ring.pop() is not None
    del buf
    region.unlink()
    region.close()
    assert region.closed
    with pytest.raises(ValueError):  # its buffer went with the mapping: a use fails, it does not crash
        _ = ring.credits
