"""Layout of a fast link's region: geometry round trip and checks, descriptors, slot headers that must
match their descriptor, and error status words."""

from __future__ import annotations

import pytest

from asap.dataplane.fastlink import (
    DONE_FLAG_AT,
    FLAG_SHAPE_ONLY,
    REQUEST_FLAG_AT,
    SLOT_HEADER_BYTES,
    Completion,
    LinkGeometry,
    Request,
    SlotHeader,
    error_of,
    read_error,
    status_of,
    write_error,
)
from asap.errors import InternalError, InvalidArgument, Unavailable


def _geometry() -> LinkGeometry:
    return LinkGeometry(slots=4, slot_bytes=64 * 1024, hidden_size=64, top_k=2, itemsize=4)


def test_geometry_round_trip_and_slots_do_not_overlap_rings() -> None:
    g = _geometry()
    buf = memoryview(bytearray(g.nbytes))
    g.write(buf)
    assert LinkGeometry.read(buf) == g
    assert g.slots_at >= g.completions_at + 64 and g.slot_at(3) + g.slot_bytes == g.nbytes
    rows = g.max_rows(shape_only=False)
    assert g.payload(rows, shape_only=False)[3] <= g.slot_bytes < g.payload(rows + 1, shape_only=False)[3]
    assert g.max_rows(shape_only=True) > rows  # no row values: more rows per slot


def test_truncated_or_foreign_region_is_refused() -> None:
    g = _geometry()
    buf = memoryview(bytearray(g.nbytes))
    with pytest.raises(InvalidArgument, match="magic"):
        LinkGeometry.read(buf)
    g.write(buf)
    with pytest.raises(InvalidArgument, match="needs"):
        LinkGeometry.read(buf[: g.nbytes - 1])
    with pytest.raises(InvalidArgument):
        LinkGeometry(slots=0, slot_bytes=64 * 1024, hidden_size=64, top_k=2, itemsize=4)


def test_descriptors_round_trip_and_are_checked() -> None:
    g = _geometry()
    r = Request(micro_batch=7, layer=3, slot=2, rows=5, flags=0, seq=11, sent_unix_ns=1, not_before_ns=2)
    assert Request.unpack(r.pack()) == r
    r.check(g)
    c = Completion(7, 3, 2, 0, 5, 11, 10, 20, 30)
    assert Completion.unpack(c.pack()) == c
    for bad in (
        Request(7, 3, 4, 5, 0, 11, 1, 2),  # no such slot
        Request(7, 3, 0, 10**6, 0, 11, 1, 2),  # does not fit
        Request(7, 3, 0, 5, 0x80, 11, 1, 2),  # unknown flag
    ):
        with pytest.raises(InvalidArgument):
            bad.check(g)
    Request(7, 3, 0, g.max_rows(shape_only=True), FLAG_SHAPE_ONLY, 1, 0, 0).check(g)


def test_slot_header_must_match_its_descriptor() -> None:
    g = _geometry()
    buf = memoryview(bytearray(g.nbytes))
    at = g.slot_at(1)
    SlotHeader(7, 11, 3, 5, 99, "00-abc-def-01", "k=v").write(buf, at)
    request = Request(7, 3, 1, 5, 0, 11, 99, 0)
    header = SlotHeader.read(buf, at, request)
    assert (header.traceparent, header.tracestate, header.sent_unix_ns) == ("00-abc-def-01", "k=v", 99)
    with pytest.raises(InvalidArgument, match="does not match"):
        SlotHeader.read(buf, at, Request(7, 3, 1, 5, 0, 12, 99, 0))  # stale sequence number


def test_error_status_and_text_round_trip() -> None:
    assert status_of(None) == 0
    buf = memoryview(bytearray(2048))
    write_error(buf, 0, "experts [3] are not hosted")
    err = error_of(status_of(InvalidArgument("x")), read_error(buf, 0))
    assert isinstance(err, InvalidArgument) and "not hosted" in err.message
    assert isinstance(error_of(status_of(Unavailable("x")), ""), Unavailable)
    assert isinstance(error_of(status_of(InternalError("x")), ""), InternalError)
    assert isinstance(error_of(999, "?"), InvalidArgument)


def test_gpu_geometry_keeps_only_slot_headers_in_shared_memory() -> None:
    cpu = _geometry()
    gpu = LinkGeometry(slots=4, slot_bytes=64 * 1024, hidden_size=64, top_k=2, itemsize=4, device_slots=True)
    buf = memoryview(bytearray(gpu.nbytes))
    gpu.write(buf)
    assert LinkGeometry.read(buf) == gpu and LinkGeometry.read(buf).device_slots
    assert gpu.nbytes < cpu.nbytes and gpu.slots_at == cpu.slots_at
    assert gpu.slot_at(3) + SLOT_HEADER_BYTES == gpu.nbytes  # headers only
    assert (
        gpu.device_nbytes == 4 * 64 * 1024
        and gpu.device_slot_at(2) == 2 * 64 * 1024
        and cpu.device_nbytes == 0
    )
    # the flags sit in the device slot's header room, before the payload
    assert gpu.payload(1, shape_only=False)[0] >= DONE_FLAG_AT + 4 and REQUEST_FLAG_AT != DONE_FLAG_AT
    assert gpu.max_rows(shape_only=False) == cpu.max_rows(shape_only=False)


def test_unknown_geometry_flags_are_refused() -> None:
    g = _geometry()
    buf = memoryview(bytearray(g.nbytes))
    g.write(buf)
    buf[36:40] = (6).to_bytes(4, "little")  # the flags word: an unknown bit
    with pytest.raises(InvalidArgument, match="geometry flags"):
        LinkGeometry.read(buf)
