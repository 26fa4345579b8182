"""Rank health in one place: the core's rank table, changed by the monitor's probes only on a change."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from asap.errors import AsapError, InvalidArgument
from asap.syncstep import SyncStep
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import SchedulerCore
from scheduler_svc.health import record_probes, watch_ranks
from scheduler_svc.requests import RankResultItem, ScheduledRequest


class IdleClient:
    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        sync: SyncStep | None = None,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> list[RankResultItem | AsapError | None]:
        return [RankResultItem(1, -0.5, [], r.prompt_tokens) for r in requests]


class RecordingHealth:
    """A RankHealth that records the calls it gets."""

    def __init__(self, healthy: list[bool]) -> None:
        self.healthy = healthy
        self.calls: list[tuple[str, int]] = []

    def is_healthy(self, rank: int) -> bool:
        return self.healthy[rank]

    def mark_rank_down(self, rank: int, reason: str) -> None:
        self.calls.append(("down", rank))
        self.healthy[rank] = False

    def mark_rank_up(self, rank: int) -> None:
        self.calls.append(("up", rank))
        self.healthy[rank] = True


def test_probes_change_health_only_on_a_change() -> None:
    health = RecordingHealth([True, True, False])
    record_probes(health, [True, False, True])
    assert health.calls == [("down", 1), ("up", 2)]
    record_probes(health, [True, False, True])  # nothing changed: nothing reported again
    assert health.calls == [("down", 1), ("up", 2)]


async def test_the_core_is_the_record_the_monitor_reads_and_writes() -> None:
    core = SchedulerCore(SchedulerConfig(), 2, IdleClient())
    record_probes(core, [True, False])
    assert core.is_healthy(0) and not core.is_healthy(1)
    assert core.state().ranks[1].down_reason == "health check failed"
    core.mark_rank_down(0, "stream broke")  # as the core does itself when a batch fails Unavailable
    assert not core.ranks.any_healthy()
    record_probes(core, [True, True])
    assert core.ranks.healthy_ranks() == [0, 1]
    with pytest.raises(InvalidArgument):
        core.is_healthy(2)


async def test_watch_ranks_probes_every_rank_each_round() -> None:
    health = RecordingHealth([True, True])
    probed: list[int] = []
    rounds = asyncio.Event()

    async def probe(rank: int) -> bool:
        probed.append(rank)
        if len(probed) == 4:
            rounds.set()
        return rank == 0

    task = asyncio.create_task(watch_ranks(probe, 2, health, interval_s=0))
    try:
        async with asyncio.timeout(2.0):
            await rounds.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert probed[:4] == [0, 1, 0, 1]
    assert health.calls == [("down", 1)]
