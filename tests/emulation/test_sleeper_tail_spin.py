"""``Sleeper``'s tail spin on a fake clock: off unless the thread's spin allows it (``allow_tail_spin``),
then the last stretch of each sleep (about the overshoot's spread, within the cap) is spun with the core
given away between looks, and a sleep still never returns before its deadline."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from asap.emulation import clock as clock_mod
from asap.emulation.clock import Sleeper, allow_tail_spin, tail_spin_allowed, tail_spin_cap_s
from asap.errors import InvalidArgument


class VaryingTime:
    """A clock that ``sleep`` advances by the requested time plus the next overshoot of a cycle; each
    read costs ``tick``; ``yield_`` counts the looks of a tail spin and moves the clock by ``step``."""

    def __init__(self, overshoots: list[float], tick: float = 1e-6, step: float = 5e-6) -> None:
        self.now = 100.0
        self.overshoots = overshoots
        self.tick = tick
        self.step = step
        self.slept: list[float] = []
        self.yields = 0

    def clock(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds + self.overshoots[len(self.slept) % len(self.overshoots)]

    def yield_(self) -> None:
        self.yields += 1
        self.now += self.step


@pytest.fixture(autouse=True)
def _no_tail_after() -> Iterator[None]:
    yield
    allow_tail_spin(False)  # the flag is the thread's: leave the test thread as it was


def _sleeper(t: VaryingTime, cap_s: float = clock_mod.TAIL_CAP_S) -> Sleeper:
    return Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep, yield_=t.yield_, tail_cap_s=cap_s)


def _spread() -> VaryingTime:
    return VaryingTime([20e-6] * 5 + [150e-6] * 5)  # half the wake-ups late by 130 µs more


def test_the_default_sleeper_never_spins_a_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(clock_mod.TAIL_SPIN_ENV, raising=False)
    t = _spread()
    sleeper = Sleeper(bias_s=0.0, clock=t.clock, sleep=t.sleep, yield_=t.yield_)  # no cap: the env's
    allow_tail_spin(True)
    for _ in range(100):
        sleeper.sleep(5e-4)
    assert t.yields == 0
    assert sleeper.tail_s == 0.0


def test_no_tail_spin_unless_the_thread_allows_it() -> None:
    assert not tail_spin_allowed()
    t = _spread()
    sleeper = _sleeper(t)
    for _ in range(200):
        start = t.clock()
        sleeper.sleep(5e-4)
        assert t.now >= start + 5e-4
    assert t.yields == 0
    assert sleeper.tail_s > 50e-6  # it learned the spread, but did not use it


def test_an_allowed_tail_spins_the_spread_of_the_overshoot_and_never_ends_early() -> None:
    t = _spread()
    sleeper = _sleeper(t)
    for _ in range(200):  # learn the quantiles first
        sleeper.sleep(5e-4)
    assert 15e-6 <= sleeper.bias_s <= 25e-6  # the low quantile
    assert 100e-6 <= sleeper.tail_s <= 140e-6  # high quantile minus bias
    allow_tail_spin(True)
    lates = []
    for _ in range(20):
        start = t.clock()
        sleeper.sleep(5e-4)
        assert t.now >= start + 5e-4
        lates.append(t.now - start - 5e-4)
    assert t.yields > 0
    assert max(lates) <= 30e-6  # within the spread's top: every wake-up was before the deadline
    assert t.slept[-1] < 5e-4 - sleeper.bias_s - 90e-6  # it woke the tail earlier


def test_the_tail_is_capped_and_a_zero_cap_turns_it_off() -> None:
    t = VaryingTime([0.0] * 5 + [900e-6] * 5)
    sleeper = _sleeper(t, cap_s=100e-6)
    for _ in range(300):
        sleeper.sleep(2e-3)
    assert sleeper.tail_s == pytest.approx(100e-6)
    off = _sleeper(_spread(), cap_s=0.0)
    allow_tail_spin(True)
    for _ in range(50):
        off.sleep(5e-4)
    assert off.tail_s == 0.0


def test_a_sleep_shorter_than_the_tail_is_spun_whole() -> None:
    t = _spread()
    sleeper = _sleeper(t)
    for _ in range(200):
        sleeper.sleep(5e-4)
    allow_tail_spin(True)
    slept = len(t.slept)
    start = t.clock()
    sleeper.sleep(50e-6)
    assert len(t.slept) == slept  # no OS sleep at all
    assert t.now >= start + 50e-6


def test_cap_from_the_environment() -> None:
    assert tail_spin_cap_s({}) == 0.0  # off unless asked
    assert tail_spin_cap_s({clock_mod.TAIL_SPIN_ENV: "300"}) == pytest.approx(clock_mod.TAIL_CAP_S)
    assert tail_spin_cap_s({clock_mod.TAIL_SPIN_ENV: "0"}) == 0.0
    assert tail_spin_cap_s({clock_mod.TAIL_SPIN_ENV: "120"}) == pytest.approx(120e-6)
    for bad in ("soon", "-5"):
        with pytest.raises(InvalidArgument):
            tail_spin_cap_s({clock_mod.TAIL_SPIN_ENV: bad})
