"""Two NIXL link ends in one process (UCX loopback): a WRITE of a slot's bytes arrives before its
notification, slots use the fast link's layout, and an end refuses announcements it cannot use with
``InvalidArgument``. Skipped where NIXL is not importable."""

from __future__ import annotations

import time

import pytest
import torch

from asap.dataplane.fastlink import LinkGeometry, SlotHeader
from asap.dataplane.nixl_attention import fill_slot
from asap.dataplane.nixl_link import NixlEnd, nixl_missing
from asap.errors import InvalidArgument
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
