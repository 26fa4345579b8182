"""``Sleeper``'s deadline rules on a fake clock: ``begin`` counts the modelled time from the work's
start, the bias follows the observed overshoot, and a sleep never returns before its deadline."""

from __future__ import annotations

import pytest

from asap.emulation.clock import Sleeper


class FakeTime:
    """A clock that ``sleep`` advances by the requested time plus a fixed overshoot; each read of the
    clock costs ``tick`` (so a spin ends)."""

    def __init__(self, overshoot: float, tick: float = 1e-6) -> None:
        self.now = 100.0
        self.overshoot = overshoot
        self.tick = tick
        self.slept: list[float] = []

    def clock(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds + self.overshoot


def test_begin_counts_host_work_inside_the_modelled_time() -> None:
    t = FakeTime(overshoot=0.0, tick=0.0)
    sleeper = Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep)
    sleeper.begin()
    t.now += 3e-4  # host work after begin: validation, counting rows
    start = t.now - 3e-4
    sleeper.sleep(1e-3)
    assert t.now == pytest.approx(start + 1e-3)
    assert t.slept == [pytest.approx(7e-4)]
    assert sleeper.requested_s == pytest.approx(1e-3)  # the full modelled time is charged


def test_begin_applies_to_the_next_sleep_only() -> None:
    t = FakeTime(overshoot=0.0, tick=0.0)
    sleeper = Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep)
    sleeper.begin()
    t.now += 2e-3  # the work outran its modelled time: nothing left to sleep
    sleeper.sleep(1e-3)
    assert t.slept == []
    before = t.now
    sleeper.sleep(1e-3)  # no begin since: counted from this call
    assert t.now == pytest.approx(before + 1e-3)


def test_bias_learns_the_overshoot_and_sleeps_never_end_early() -> None:
    t = FakeTime(overshoot=50e-6)
    sleeper = Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep)
    for _ in range(100):
        start = t.clock()
        sleeper.sleep(5e-4)
        assert t.now >= start + 5e-4
    assert 40e-6 <= sleeper.bias_s <= 51e-6
    start = t.clock()
    sleeper.sleep(5e-4)
    assert t.now - start == pytest.approx(5e-4, abs=12e-6)  # the overshoot is compensated


def test_a_bias_too_large_is_spun_off_not_returned_early() -> None:
    t = FakeTime(overshoot=0.0)
    sleeper = Sleeper(bias_s=2e-4, clock=t.clock, sleep=t.sleep)
    start = t.clock()
    sleeper.sleep(5e-4)
    assert t.now >= start + 5e-4
    assert sleeper.bias_s < 2e-4  # it learned that this host wakes on time


def test_keep_pending_keeps_an_earlier_unused_begin() -> None:
    t = FakeTime(overshoot=0.0, tick=0.0)
    sleeper = Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep)
    sleeper.begin()  # the caller took the inputs: the work starts here
    start = t.now
    t.now += 2e-4  # the caller's host work (combining the inputs)
    sleeper.begin(keep_pending=True)  # the part's own begin: the earlier one stands
    sleeper.sleep(1e-3)
    assert t.now == pytest.approx(start + 1e-3)
    assert sleeper.requested_s == pytest.approx(1e-3)
    t.now += 1e-4
    sleeper.begin(keep_pending=True)  # nothing pending (the sleep used it): starts now
    start = t.now
    sleeper.sleep(1e-3)
    assert t.now == pytest.approx(start + 1e-3)


def test_begin_at_an_earlier_time_counts_from_it_never_from_the_future() -> None:
    t = FakeTime(overshoot=0.0, tick=0.0)
    sleeper = Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep)
    start = t.now
    t.now += 2e-4  # the inputs were taken 200 µs ago
    sleeper.begin(at=start)
    sleeper.sleep(1e-3)
    assert t.now == pytest.approx(start + 1e-3)
    assert sleeper.requested_s == pytest.approx(1e-3)
    sleeper.begin(at=t.now + 5.0)  # a start in the future is now
    now = t.now
    sleeper.sleep(1e-3)
    assert t.now == pytest.approx(now + 1e-3)
