"""The health monitor of the attention ranks: probes them and records what it sees in the core.

Rank health has one record, the core's ``RankTable``; the monitor holds none of its own. Each round it
probes every rank (grpc health, in the attention client) and tells the core of a change only: a healthy
rank that stops answering SERVING goes down, a down rank that answers again comes up. A rank whose
stream broke is marked down by the core itself (its batch failed with ``Unavailable``) and comes back here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0


class RankHealth(Protocol):
    """Where rank health is recorded (``SchedulerCore`` implements it)."""

    def is_healthy(self, rank: int) -> bool: ...

    def mark_rank_down(self, rank: int, reason: str) -> None: ...

    def mark_rank_up(self, rank: int) -> None: ...


def record_probes(health: RankHealth, answers: Sequence[bool]) -> None:
    """Apply one round of probe answers (``answers[rank]``: it answered SERVING) to ``health``."""
    for rank, serving in enumerate(answers):
        if serving and not health.is_healthy(rank):
            logger.info("attention rank %d is back", rank)
            health.mark_rank_up(rank)
        elif not serving and health.is_healthy(rank):
            health.mark_rank_down(rank, "health check failed")


async def watch_ranks(
    probe: Callable[[int], Awaitable[bool]],
    num_ranks: int,
    health: RankHealth,
    interval_s: float = HEALTH_INTERVAL_S,
) -> None:
    """Every ``interval_s``: probe every rank and record the answers. Runs until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        answers = await asyncio.gather(*(probe(rank) for rank in range(num_ranks)))
        record_probes(health, answers)
