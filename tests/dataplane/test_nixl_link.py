"""Two NIXL link ends in one process (UCX loopback): a WRITE of a slot's bytes arrives before its
notification, slots use the fast link's layout, rows are WRITTEN from the tensor they live in, results
are leased as views of their slot (at most half the slots; the slot comes back when the last view is
freed), and an end refuses announcements it cannot use with ``InvalidArgument``. Skipped where NIXL is
not importable."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from asap.dataplane.direct import Ticket, Wake
from asap.dataplane.fastlink import SLOT_HEADER_BYTES, Completion, LinkGeometry, Request, SlotHeader
from asap.dataplane.nixl_attention import NixlAttentionEnd, completion_notification, fill_slot, write_dispatch
from asap.dataplane.nixl_link import NixlEnd, nixl_missing
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.errors import InvalidArgument
from asap.model.placement import RankDispatch
from asap.v1 import expert_pb2

pytestmark = pytest.mark.skipif(bool(nixl_missing()), reason=nixl_missing() or "NIXL")

GEOMETRY = LinkGeometry(slots=2, slot_bytes=64 * 1024, hidden_size=16, top_k=2, itemsize=4)


def _notes(end: NixlEnd, sender: NixlEnd, timeout_s: float = 30.0) -> list[bytes]:
    """The notifications of ``end``, polling both ends as their poll threads would (no progress thread:
    these calls are what moves the WRITE on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert sender.reap() == ""
        got = end.notifications()
        if got:
            return got
        time.sleep(0.001)
    raise AssertionError("no notification")


def test_a_filled_slot_arrives_with_its_notification() -> None:
    a, b = NixlEnd("ta", GEOMETRY, torch.device("cpu")), NixlEnd("tb", GEOMETRY, torch.device("cpu"))
    try:
        a.connect(b.announcement())
        b.connect(a.announcement())
        rows = 3
        hidden = torch.randn(rows, 16)
        ids = torch.tensor([[0, 1], [1, -1], [2, 3]], dtype=torch.int32)
        weights = torch.rand(rows, 2)
        header = SlotHeader(7, 1, 2, rows, 123, "00-abc", "")
        end = fill_slot(a.slot(1), GEOMETRY, torch.float32, header, hidden, ids, weights)
        a.write(1, 0, end, b"R-note")
        assert _notes(b, a) == [b"R-note"]
        assert torch.equal(b.slot(1)[:end], a.slot(1)[:end])
        at = GEOMETRY.payload(rows, shape_only=False)[0]
        got = b.slot(1)[at : at + rows * 16 * 4].view(torch.float32).view(rows, 16)
        assert torch.equal(got, hidden)
        assert b.bytes_written == 0 and a.bytes_written == end
    finally:
        a.close()
        b.close()


def test_unusable_announcements_are_refused() -> None:
    a, b = NixlEnd("ta", GEOMETRY, torch.device("cpu")), NixlEnd("tb", GEOMETRY, torch.device("cpu"))
    try:
        good = b.announcement()
        cases = {
            "metadata": (lambda m: setattr(m, "metadata", b"\x01" * 32), "bad NIXL agent metadata"),
            "empty": (lambda m: setattr(m, "metadata", b""), "metadata of 0 bytes"),
            "name": (lambda m: setattr(m, "agent", "x; rm"), "is not asap-"),
            "other": (lambda m: setattr(m, "agent", "asap-someone-else"), "announced as"),
            "geometry": (lambda m: setattr(m, "slots", 3), "does not match"),
            "memory": (lambda m: setattr(m, "memory", "FILE"), "NIXL link memory"),
        }
        for spoil, match in cases.values():
            link = expert_pb2.NixlLink()
            link.CopyFrom(good)
            spoil(link)
            with pytest.raises(InvalidArgument, match=match):
                a.connect(link)
        a.connect(good)  # still usable after the refusals
        assert a.peer == good.agent
    finally:
        a.close()
        b.close()


def _pair(geometry: LinkGeometry = GEOMETRY) -> tuple[NixlEnd, NixlEnd]:
    a, b = NixlEnd("ta", geometry, torch.device("cpu")), NixlEnd("tb", geometry, torch.device("cpu"))
    a.connect(b.announcement())
    b.connect(a.announcement())
    return a, b


def test_rows_are_written_from_the_memory_they_live_in() -> None:
    """One WRITE of header, rows (from the dispatch's own tensor, registered for it) and routing lands
    in the peer's slot exactly as a slot filled by copies would, and the registration goes with it."""
    a, b = _pair()
    try:
        rows = 5
        hidden = torch.randn(rows, 16)
        ids = torch.tensor([[0, 1], [1, -1], [2, 3], [3, 0], [-1, -1]], dtype=torch.int32)
        weights = torch.rand(rows, 2)
        header = SlotHeader(3, 9, 1, rows, 456, "00-abc", "")
        a.slots.zero_()
        write_dispatch(a, 0, torch.float32, header, hidden, ids, weights, b"R-zero-copy")
        assert _notes(b, a) == [b"R-zero-copy"]
        expected = torch.zeros(GEOMETRY.slot_bytes, dtype=torch.uint8)
        end = fill_slot(expected, GEOMETRY, torch.float32, header, hidden, ids, weights)
        at, ids_at, weights_at, _ = GEOMETRY.payload(rows, shape_only=False)
        k = rows * 2 * 4
        pieces = ((0, SLOT_HEADER_BYTES), (at, at + rows * 16 * 4), (ids_at, ids_at + k), (weights_at, end))
        for start, stop in pieces:  # (the padding between them is never written)
            assert torch.equal(b.slot(0)[start:stop], expected[start:stop])
        assert not a.slot(0)[at : at + rows * 16 * 4].any()  # the rows were not copied into a's slot
        deadline = time.monotonic() + 30
        while a.writing and time.monotonic() < deadline:  # reaped: handle released, memory deregistered
            assert a.reap() == ""
        assert not a.writing
    finally:
        a.close()
        b.close()


def _answer(expert: NixlEnd, note: bytes, results: torch.Tensor) -> None:
    """The expert end's answer to the request ``note``: the results over the rows, then the completion."""
    request = Request.unpack(note[1:])
    at = GEOMETRY.payload(request.rows, shape_only=False)[0]
    completion = Completion.answering(request, None, queue_ns=0, compute_ns=7, picked_unix_ns=0)
    registered = None if expert.buffers.owns(results) else expert.register(results)
    piece = (int(results.data_ptr()), results.numel() * 4, at)
    expert.post(
        request.slot, [piece], completion_notification(completion), registered=registered, hold=results
    )


def _round_trip(
    end: NixlAttentionEnd, expert: NixlEnd, rows: int, from_buffer: bool = False
) -> tuple[Ticket, torch.Tensor, int]:
    ticket = Ticket(Wake())
    slot = end.take_slot_blocking(ticket)
    request = PlaneRequest(1, 0, RankDispatch(0, torch.arange(rows), torch.randn(rows, 16),
                                              torch.zeros(rows, 2, dtype=torch.int32), torch.ones(rows, 2)))  # fmt: skip
    header = end.header(request)
    end.expect(slot, header, ticket)
    d = request.dispatch
    write_dispatch(end.end, slot, torch.float32, header, d.hidden, d.expert_ids, d.weights,
                   end.descriptor(slot, request, header.seq))  # fmt: skip
    results = torch.randn(rows, 16)
    [note] = _notes(expert, end.end)
    if from_buffer:  # computed into the expert end's registered buffer of that slot (the CPU rank's way)
        into = expert.buffers.get(Request.unpack(note[1:]).slot)[: rows * 16 * 4].view(torch.float32)
        results = into.view(rows, 16).copy_(results)
    _answer(expert, note, results)
    deadline = time.monotonic() + 30
    while not ticket.done and time.monotonic() < deadline:
        expert.reap()
        end.poll(time.monotonic_ns(), sweeper=False)
    assert ticket.done
    return ticket, results, slot


def test_results_lease_their_slot_until_freed_and_half_the_slots_at_most() -> None:
    a, b = _pair()
    end = NixlAttentionEnd(a, peer="tb", dtype=torch.float32, rank=0, loop=None, peer_timeout_s=60)
    try:
        assert end.lease_cap == 1  # of 2 slots
        first, expected, slot = _round_trip(end, b, 3)
        assert isinstance(first.outcome, ExchangeResult)
        leased = first.outcome.hidden
        assert torch.equal(leased, expected) and end.leases == 1
        assert slot not in end._free  # a view of the slot's memory: the slot stays taken
        second, expected2, slot2 = _round_trip(end, b, 4)  # the other slot; one lease out already
        assert isinstance(second.outcome, ExchangeResult)
        assert torch.equal(second.outcome.hidden, expected2) and end.leases == 1  # copied, not leased
        assert slot2 != slot and slot2 in end._free
        view = leased[1:]
        first.outcome = None
        del leased
        gc.collect()
        assert slot not in end._free  # a view of the lease still holds it
        del view
        gc.collect()
        assert slot in end._free and end.expert_ns == 14
    finally:
        end.close()
        b.close()


def test_answers_from_an_ends_slot_buffers_are_registered_once_per_slot() -> None:
    """Results computed into the expert end's buffer of the slot arrive as from any tensor, and the
    buffer is registered once (kept for the next answer on that slot), not per WRITE."""
    a, b = _pair()
    end = NixlAttentionEnd(a, peer="tb", dtype=torch.float32, rank=0, loop=None, peer_timeout_s=60)
    try:
        slots = set()
        for rows in (3, 5, 2, 4):
            ticket, expected, slot = _round_trip(end, b, rows, from_buffer=True)
            assert isinstance(ticket.outcome, ExchangeResult)
            assert torch.equal(ticket.outcome.hidden, expected)
            assert b.buffers.owns(expected)
            slots.add(slot)
            ticket.outcome = None
            gc.collect()
        assert b.buffers.registrations == len(slots) <= GEOMETRY.slots
    finally:
        end.close()
        b.close()
    assert not b.buffers.owns(expected)  # closing the end dropped its buffers
