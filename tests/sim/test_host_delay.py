"""The per-layer host delay of a simulated rank (``asap.sim.hostcost.HostDelay``)."""

from __future__ import annotations

import statistics

import pytest

from asap.errors import InvalidArgument
from asap.sim.hostcost import HostCores, HostDelay


def test_no_jitter_is_the_mean_every_time() -> None:
    host = HostDelay(0.004)
    assert {host(t * 0.001) for t in range(10)} == {0.004}


def test_one_draw_per_instant_mean_and_spread_as_given() -> None:
    host = HostDelay(0.010, 0.004, seed=3)
    assert host(1.0) == host(1.0)  # the dispatches of one layer, sent together, share the draw
    draws = [host(float(t)) for t in range(2, 20_002)]
    assert min(draws) >= 0.010 - 0.004  # shifted exponential: never below mean - jitter
    assert statistics.fmean(draws) == pytest.approx(0.010, rel=0.03)
    assert statistics.pstdev(draws) == pytest.approx(0.004, rel=0.05)
    again = HostDelay(0.010, 0.004, seed=3)
    assert again(1.0) == HostDelay(0.010, 0.004, seed=3)(1.0)  # reproducible per seed


def test_slowest_of_eight_pays_the_exponential_tail() -> None:
    # what a sync barrier of 8 participants waits for: mean + jitter * (H_8 - 1)
    hosts = [HostDelay(0.010, 0.004, seed=rank) for rank in range(8)]
    slowest = [max(host(float(t)) for host in hosts) for t in range(20_000)]
    harmonic = sum(1 / k for k in range(1, 9))
    assert statistics.fmean(slowest) == pytest.approx(0.010 + 0.004 * (harmonic - 1), rel=0.03)


@pytest.mark.parametrize(("mean_s", "jitter_s"), [(-1.0, 0.0), (0.001, -1.0), (0.001, 0.002)])
def test_rejects_bad_values(mean_s: float, jitter_s: float) -> None:
    with pytest.raises(InvalidArgument):
        HostDelay(mean_s, jitter_s)


def test_shared_cores_queue_the_cpu_part_of_ranks_that_run_together() -> None:
    cores = HostCores(2)
    ranks = [HostDelay(0.010, 0.0, rank, cores, cpu_s=0.004) for rank in range(4)]
    # four ranks at the same instant (a sync barrier's release) on two cores: the last two wait 4 ms
    assert [host(1.0) for host in ranks] == pytest.approx([0.010, 0.010, 0.014, 0.014])
    assert [host(1.0) for host in ranks] == pytest.approx([0.010, 0.010, 0.014, 0.014])  # same layer
    # staggered by more than the work (async ranks): no one waits
    assert [host(2.0 + 0.005 * r) for r, host in enumerate(ranks)] == pytest.approx([0.010] * 4)
    assert cores.busy_s == pytest.approx(8 * 0.004)
    with pytest.raises(InvalidArgument):
        HostCores(0)
    with pytest.raises(InvalidArgument):
        HostDelay(0.001, 0.0, 0, cores, cpu_s=0.002)
