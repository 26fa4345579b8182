"""The bounded adaptive spin before a park (``asap.dataplane.spin``) and its use by ``Backoff``."""

from __future__ import annotations

import pytest

from asap.dataplane import spin as spin_mod
from asap.dataplane.ring import Backoff, Ring
from asap.dataplane.spin import MISS_LIMIT, REST_WAITS, SPAN, SpinBudget, spin_cap_s, spin_setting
from asap.emulation.clock import allow_tail_spin, tail_spin_allowed
from asap.errors import InvalidArgument


class _Clock:
    """A clock that moves only when the spin yields (``step`` per yield) or the test moves it."""

    def __init__(self, step: float = 10e-6) -> None:
        self.now = 0.0
        self.step = step
        self.yields = 0

    def __call__(self) -> float:
        return self.now

    def yield_(self) -> None:
        self.yields += 1
        self.now += self.step


def _budget(cap_s: float = 1e-3, cores: int = 2) -> tuple[SpinBudget, _Clock]:
    clock = _Clock()
    return SpinBudget(cap_s, cores=cores, clock=clock, yield_=clock.yield_), clock


def _learned(budget: SpinBudget, wait_s: float, n: int = 8) -> SpinBudget:
    for _ in range(n):
        budget.observe(wait_s)
    return budget


def test_cap_from_the_environment() -> None:
    assert spin_cap_s({}) == spin_mod.DEFAULT_CAP_S
    assert spin_cap_s({"ASAP_FAST_SPIN_US": "auto"}) == spin_mod.DEFAULT_CAP_S
    assert spin_cap_s({"ASAP_FAST_SPIN_US": "0"}) == 0.0
    assert spin_cap_s({"ASAP_FAST_SPIN_US": "off"}) == 0.0
    assert spin_cap_s({"ASAP_FAST_SPIN_US": "250"}) == pytest.approx(250e-6)
    with pytest.raises(InvalidArgument):
        spin_cap_s({"ASAP_FAST_SPIN_US": "soon"})
    with pytest.raises(InvalidArgument):
        spin_cap_s({"ASAP_FAST_SPIN_US": "-1"})


def test_no_spin_before_it_has_seen_waits() -> None:
    budget, _ = _budget()
    assert budget.budget_s(peers=1) == 0.0
    budget.observe(200e-6)
    assert budget.budget_s(peers=1) == 0.0  # fewer than four waits seen


def test_spins_about_the_median_wait_within_the_cap() -> None:
    budget = _learned(_budget(cap_s=1e-3)[0], 400e-6)
    assert budget.budget_s(peers=1) == pytest.approx(SPAN * 400e-6)
    capped = _learned(_budget(cap_s=1e-3)[0], 900e-6)
    assert capped.budget_s(peers=1) == pytest.approx(1e-3)  # 1.5 x 900 µs, cut to the cap


def test_no_spin_when_waits_are_longer_than_the_cap() -> None:
    budget = _learned(_budget(cap_s=1e-3)[0], 5e-3)
    assert budget.budget_s(peers=1) == 0.0


def test_no_spin_when_the_peers_do_not_fit_the_cores() -> None:
    two = _learned(_budget(cores=2)[0], 300e-6)
    assert two.budget_s(peers=1) > 0  # 1+1 on two cores
    assert two.budget_s(peers=4) == 0.0  # 4+4 on two cores
    assert two.budget_s(peers=0) == 0.0
    many = _learned(_budget(cores=16)[0], 300e-6)
    assert many.budget_s(peers=4) > 0


def test_off_never_spins() -> None:
    budget = _learned(_budget(cap_s=0.0)[0], 300e-6)
    assert not budget.spin(lambda: True, peers=1)
    assert budget.spins == 0


def test_a_hit_ends_the_spin_at_once() -> None:
    budget, clock = _budget()
    _learned(budget, 300e-6)
    looks = iter([False, False, True])
    assert budget.spin(lambda: next(looks), peers=1)
    assert (budget.spins, budget.hits, clock.yields) == (1, 1, 2)


def test_a_miss_stops_at_the_budget() -> None:
    budget, clock = _budget()
    _learned(budget, 300e-6)
    assert not budget.spin(lambda: False, peers=1)
    assert clock.now == pytest.approx(SPAN * 300e-6, abs=clock.step)
    assert budget.hits == 0


def test_misses_in_a_row_rest_the_spin_then_it_probes_again() -> None:
    budget, _ = _budget()
    _learned(budget, 300e-6)
    for _ in range(MISS_LIMIT):
        assert not budget.spin(lambda: False, peers=1)
    spins = budget.spins
    for _ in range(REST_WAITS):
        assert not budget.spin(lambda: True, peers=1)  # resting: parks at once, ready or not
    assert budget.spins == spins
    assert budget.spin(lambda: True, peers=1)  # the rest is over: one probe, and it pays


def test_a_hit_clears_the_misses() -> None:
    budget, _ = _budget()
    _learned(budget, 300e-6)
    for _ in range(3 * MISS_LIMIT):
        for _ in range(MISS_LIMIT - 1):
            budget.spin(lambda: False, peers=1)
        assert budget.spin(lambda: True, peers=1)
    assert budget._rest == 0


def test_backoff_spins_once_per_gap_and_observes_the_gaps() -> None:
    clock = _Clock()
    budget = SpinBudget(1e-3, cores=2, clock=clock, yield_=clock.yield_)
    buf = memoryview(bytearray(Ring.nbytes(4)))
    producer, consumer = Ring(buf, 0, 4), Ring(buf, 0, 4)
    backoff = Backoff(first_sleep_s=1e-6, park_s=1e-6, clock=clock, spin=budget)
    for _ in range(4):  # four gaps of 300 µs, each idled once: the budget learns them
        backoff.reset()
        clock.now += 300e-6
        backoff.idle([consumer], [])
    backoff.reset()
    assert len(budget._waits) == 4 and budget._median == pytest.approx(300e-6)
    assert budget.spins == 0  # nothing learned before: it parked (slept) each time

    # A record published during the spin: idle returns without parking.
    published = iter([False, False, True])
    consumer_ready = consumer.ready

    def ready() -> bool:
        if next(published, False):
            producer.try_push(b"x")
        return consumer_ready()

    consumer.ready = ready  # type: ignore[method-assign]
    backoff.idle([consumer], [])
    assert (budget.spins, budget.hits, backoff.parks) == (1, 1, 0)
    consumer.ready = consumer_ready  # type: ignore[method-assign]
    assert consumer.pop() is not None

    # Later looks of the same gap do not spin again.
    backoff.idle([consumer], [])
    assert budget.spins == 1


def test_backoff_without_rings_does_not_spin() -> None:
    clock = _Clock()
    budget = _learned(SpinBudget(1e-3, cores=2, clock=clock, yield_=clock.yield_), 300e-6)
    backoff = Backoff(first_sleep_s=1e-6, park_s=1e-6, clock=clock, spin=budget)
    backoff.idle([], [])
    assert budget.spins == 0


def test_setting_from_the_environment() -> None:
    assert spin_setting({}) == (spin_mod.DEFAULT_CAP_S, True)  # auto: load-gated
    assert spin_setting({"ASAP_FAST_SPIN_US": "800"}) == (pytest.approx(800e-6), False)
    assert spin_setting({"ASAP_FAST_SPIN_US": "0"}) == (0.0, False)


def test_the_load_gate_stops_the_spin_on_a_busy_host_and_reads_the_load_once_a_second() -> None:
    clock = _Clock()
    loads = [1.0]
    reads: list[float] = []

    def load() -> float:
        reads.append(clock.now)
        return loads[0]

    budget = SpinBudget(1e-3, cores=2, load_gated=True, clock=clock, yield_=clock.yield_, load=load)
    _learned(budget, 300e-6)
    assert budget.budget_s(peers=1) > 0  # load 1 on two cores: a core is free
    loads[0] = 3.5
    assert budget.budget_s(peers=1) > 0  # the reading is a second old at most
    clock.now += 1.0
    assert budget.budget_s(peers=1) == 0.0  # busy: park at once
    assert len(reads) == 2
    ungated = _learned(SpinBudget(1e-3, cores=2, clock=clock, yield_=clock.yield_, load=load), 300e-6)
    assert ungated.budget_s(peers=1) > 0  # an explicit cap is not load-gated


def test_the_budget_tells_the_threads_sleeps_whether_a_core_is_free() -> None:
    try:
        budget, _ = _budget(cores=2)
        budget.budget_s(peers=1)  # no waits seen yet, but a core is free: the tail may spin
        assert tail_spin_allowed()
        budget.budget_s(peers=4)  # 4 + 1 do not fit two cores
        assert not tail_spin_allowed()
        off, _ = _budget(cap_s=0.0)
        off.budget_s(peers=1)
        assert not tail_spin_allowed()
        clock = _Clock()
        busy = SpinBudget(1e-3, cores=2, load_gated=True, clock=clock, yield_=clock.yield_, load=lambda: 3.0)
        busy.budget_s(peers=1)
        assert not tail_spin_allowed()
    finally:
        allow_tail_spin(False)
