"""The pure recorders the cores update: bucket semantics, consistent snapshots, the busy clock."""

from __future__ import annotations

import pytest

from asap.errors import InternalError, InvalidArgument
from asap.metrics import PREFILL_BUCKETS_S, BusyClock, Distribution


def test_buckets_follow_prometheus_le() -> None:
    dist = Distribution([1.0, 2.0, 5.0])
    for value in (0.5, 1.0, 1.5, 2.0, 7.0):
        dist.observe(value)
    snap = dist.snapshot()
    # le=1: 0.5 and 1.0 (the bound itself counts); le=2: + 1.5, 2.0; le=5: same; +Inf: + 7.0
    assert snap.cumulative == (2, 4, 4, 5)
    assert snap.count == 5
    assert snap.sum == pytest.approx(12.0)


def test_an_empty_distribution_has_zero_count() -> None:
    snap = Distribution(PREFILL_BUCKETS_S).snapshot()
    assert snap.count == 0 and snap.sum == 0.0 and len(snap.cumulative) == len(PREFILL_BUCKETS_S) + 1


def test_prefill_buckets_span_one_millisecond_to_a_minute() -> None:
    assert PREFILL_BUCKETS_S[0] == 0.001 and PREFILL_BUCKETS_S[-1] == 60.0


@pytest.mark.parametrize("bounds", [[], [2.0, 1.0], [1.0, 1.0]])
def test_bounds_must_be_ascending_and_distinct(bounds: list[float]) -> None:
    with pytest.raises(InvalidArgument):
        Distribution(bounds)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def test_busy_clock_counts_overlapping_work_once() -> None:
    clock = FakeClock()
    busy = BusyClock(clock)
    busy.begin()  # t=0
    clock.now = 10
    busy.begin()  # a second batch overlaps
    clock.now = 30
    busy.end()
    assert busy.active == 1 and busy.busy_ns() == 30  # the interval in progress counts
    clock.now = 40
    busy.end()
    clock.now = 100  # idle: no more busy time
    busy.begin()
    clock.now = 105
    busy.end()
    assert busy.busy_ns() == 45 and busy.active == 0


def test_busy_clock_end_without_begin_is_a_bug() -> None:
    with pytest.raises(InternalError):
        BusyClock().end()
