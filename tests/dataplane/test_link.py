"""Attention-side region bookkeeping of a link: slots, quarantine of abandoned dispatches, retirement."""

from __future__ import annotations

import os

import pytest
import torch

from asap.dataplane.link import LinkRegions
from asap.errors import InvalidArgument
from asap.v1 import common_pb2


def _segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("asap_")}


@pytest.fixture
def regions() -> LinkRegions:
    r = LinkRegions("shm", size=1 << 16, attention_rank=1, expert_rank=2, device=torch.device("cpu"))
    yield r
    r.close()


def test_slots_are_placed_released_and_results_resolved(regions: LinkRegions) -> None:
    slots = regions.take()
    rows = torch.randn(4, 8)
    msg = slots.placer()(rows)
    assert msg is not None and msg.HasField("shm") and regions.bytes_in_use >= rows.numel() * 4
    # the expert rank writes results over the rows; the attention rank resolves its own reference
    assert slots.region.write(msg.shm.offset, rows * 3) == rows.numel() * 4
    assert torch.equal(regions.resolve(msg, [4, 8], "r"), rows * 3)
    assert regions.result_ref_bytes == rows.numel() * 4
    regions.finish((1, 0), slots, outstanding=0, stream_alive=True)
    assert regions.bytes_in_use == 0 and regions.in_quarantine == 0


def test_too_large_rows_go_inline(regions: LinkRegions) -> None:
    assert regions.take().placer()(torch.zeros(1 << 15)) is None  # 128 KiB > the 64 KiB region


def test_abandoned_dispatch_waits_for_its_late_answers(regions: LinkRegions) -> None:
    slots = regions.take()
    place = slots.placer()
    place(torch.zeros(2, 8))
    place(torch.zeros(2, 8))
    regions.finish((7, 3), slots, outstanding=2, stream_alive=True)
    assert regions.in_quarantine == 1 and regions.quarantined == 1 and regions.bytes_in_use > 0
    regions.late_answer((9, 9))  # another dispatch: no effect
    regions.late_answer((7, 3))
    assert regions.in_quarantine == 1 and regions.bytes_in_use > 0
    regions.late_answer((7, 3))
    assert regions.in_quarantine == 0 and regions.bytes_in_use == 0


def test_stream_end_frees_quarantine_and_dead_streams_never_quarantine(regions: LinkRegions) -> None:
    slots = regions.take()
    slots.placer()(torch.zeros(2, 8))
    regions.finish((1, 1), slots, outstanding=1, stream_alive=True)
    regions.stream_ended()
    assert regions.in_quarantine == 0 and regions.bytes_in_use == 0
    slots = regions.take()
    slots.placer()(torch.zeros(2, 8))
    regions.finish((1, 2), slots, outstanding=1, stream_alive=False)
    assert regions.in_quarantine == 0 and regions.quarantined == 1 and regions.bytes_in_use == 0


def test_new_stream_retires_the_region_once_unused(regions: LinkRegions) -> None:
    before = _segments()
    held = regions.take()
    msg = held.placer()(torch.ones(2, 8))
    first = held.region
    assert first.name in _segments()
    regions.new_stream()
    assert first.name not in _segments()  # name removed at once
    assert not first.closed  # still mapped: a dispatch holds slots of it
    assert msg is not None and torch.equal(regions.resolve(msg, [2, 8], "r"), torch.ones(2, 8))
    second = regions.take().region
    assert second is not first
    regions.finish((1, 0), held, outstanding=0, stream_alive=True)
    assert first.closed
    with pytest.raises(InvalidArgument, match="not this link's"):
        regions.resolve(msg, [2, 8], "r")
    regions.close()
    assert _segments() <= before


def test_bad_result_references_are_invalid_argument(regions: LinkRegions) -> None:
    slots = regions.take()
    msg = slots.placer()(torch.zeros(2, 8))
    assert msg is not None
    with pytest.raises(InvalidArgument, match="does not fit"):
        regions.resolve(msg, [3, 8], "r")
    bogus = common_pb2.Tensor(dtype=common_pb2.FLOAT32, shape=[2, 8])
    bogus.shm.CopyFrom(common_pb2.RegionRef(region="asap_nope", offset=0, nbytes=64))
    with pytest.raises(InvalidArgument, match="not this link's"):
        regions.resolve(bogus, [2, 8], "r")
    with pytest.raises(InvalidArgument, match="no regions"):
        LinkRegions("grpc", size=1, attention_rank=0, expert_rank=0, device=torch.device("cpu"))
