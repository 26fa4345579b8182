"""Restart planning of ``asap up --restart on-failure``: back-off, reset after a stable run, no restart of
clean exits or under ``--restart no``."""

from __future__ import annotations

import pytest

from asap.errors import InvalidArgument
from asap.supervise import Backoff, RestartPlan


def test_backoff_doubles_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(initial_s=1.0, max_s=5.0, stable_s=60.0)
    assert [backoff.next_delay(ran_s=2.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.next_delay(ran_s=61.0) == 1.0  # it stayed up: a fresh start
    assert backoff.next_delay(ran_s=0.5) == 2.0


def test_backoff_rejects_impossible_bounds() -> None:
    with pytest.raises(InvalidArgument):
        Backoff(initial_s=0.0)
    with pytest.raises(InvalidArgument):
        Backoff(initial_s=10.0, max_s=5.0)


def test_on_failure_schedules_each_child_on_its_own_backoff() -> None:
    plan = RestartPlan("on-failure")
    assert plan.exited("expert-0", -9, ran_s=5.0, now=100.0) == 1.0
    assert plan.exited("attention-1", 1, ran_s=5.0, now=100.0) == 1.0
    assert plan.ready(100.5) == []
    assert sorted(plan.ready(101.0)) == ["attention-1", "expert-0"]
    assert plan.ready(200.0) == []  # each restart is handed out once
    assert plan.exited("expert-0", -9, ran_s=1.0, now=102.0) == 2.0  # died again at once: back off
    assert plan.ready(103.0) == [] and plan.ready(104.0) == ["expert-0"]


def test_no_restart_policy_and_clean_exits_stop_the_cluster() -> None:
    assert RestartPlan("no").exited("expert-0", -9, ran_s=5.0, now=0.0) is None
    assert RestartPlan("on-failure").exited("expert-0", 0, ran_s=5.0, now=0.0) is None
    with pytest.raises(InvalidArgument, match="restart policy"):
        RestartPlan("always")
