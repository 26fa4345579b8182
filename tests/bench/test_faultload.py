"""The figures of a fault (``asap.bench.faultload``) and the growth rates of the soak (``procstats``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import pytest

from asap.bench.faultload import HANG, OK, UNTYPED, Call, Load, one_call, summarize
from asap.bench.procstats import per_hour, sample
from asap.errors import Unavailable


def test_summarize_counts_failures_hangs_and_the_time_to_a_typed_failure() -> None:
    load = Load(
        [
            Call(start=0.0, end=1.0, status=OK),  # before the fault
            Call(start=9.0, end=12.5, status="UNAVAILABLE"),  # in flight at the fault (10): 2.5 s
            Call(start=11.0, end=11.2, status="UNAVAILABLE"),  # sent during the outage: 0.2 s
            Call(start=9.5, end=14.0, status=OK),  # held 4 s by the fault, then served
            Call(start=12.0, end=40.0, status=HANG),
            Call(start=13.0, end=13.1, status=UNTYPED),
            Call(start=21.0, end=21.5, status="UNAVAILABLE"),  # after the rank was back (20): a finding
        ]
    )
    figures = summarize(load, fault_at=10.0, before_from=0.0, settled_at=20.0)
    assert (figures.calls, figures.ok, figures.affected, figures.unavailable) == (7, 2, 5, 3)
    assert figures.max_time_to_failure_s == pytest.approx(28.0)  # the hang dominates
    assert (figures.lost, figures.hangs, figures.failed_outside) == (2, 1, 1)
    assert figures.max_stall_s == pytest.approx(4.0)
    assert figures.statuses == {OK: 2, "UNAVAILABLE": 3, HANG: 1, UNTYPED: 1}


class _Client:
    def __init__(self, outcome: Exception | None, delay_s: float = 0.0) -> None:
        self.outcome, self.delay_s = outcome, delay_s

    async def prefill(self, *, tokens: Sequence[int] | None = None, timeout_s: float | None = None) -> object:
        await asyncio.sleep(self.delay_s)
        if self.outcome is not None:
            raise self.outcome

        class Result:
            attention_rank = 1

        return Result()


async def test_one_call_records_typed_untyped_and_hung_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    import asap.bench.faultload as faultload

    monkeypatch.setattr(faultload, "HANG_MARGIN_S", 0.0)
    calls = [Call(start=0.0) for _ in range(4)]
    await one_call(_Client(None), [1], 5.0, calls[0])  # type: ignore[arg-type]
    await one_call(_Client(Unavailable("down")), [1], 5.0, calls[1])  # type: ignore[arg-type]
    await one_call(_Client(RuntimeError("bug")), [1], 5.0, calls[2])  # type: ignore[arg-type]
    await one_call(_Client(None, delay_s=10.0), [1], 0.01, calls[3])  # type: ignore[arg-type]
    assert [c.status for c in calls] == [OK, "UNAVAILABLE", UNTYPED, HANG]
    assert calls[0].rank == 1 and calls[1].message == "down"


def test_growth_per_hour_is_the_least_squares_slope() -> None:
    assert per_hour([0.0, 60.0, 120.0], [100.0, 101.0, 102.0]) == pytest.approx(60.0)
    assert per_hour([0.0, 60.0], [5.0, 5.0]) == 0.0
    assert per_hour([0.0], [5.0]) == 0.0


def test_a_process_sample_reads_this_process() -> None:
    got = sample(os.getpid(), 1.0)
    assert got is not None and got.rss_kib > 0 and got.fds > 0 and got.threads >= 1
    assert sample(2**22 + 12345, 1.0) is None  # no such process
