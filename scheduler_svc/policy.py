"""Batch policies: which pending requests form the next batch, and which rank runs it.

The core owns queues, tasks and failure handling; a policy only decides. Async mode is implemented here;
sync global steps and min-size batching (``scheduler_svc.minbatch``) plug in as further ``BatchPolicy``
implementations.

A policy that holds requests until a time passes (min-size batching's wait bound) also implements
``wake_at``; the dispatcher asks ``next_wake`` after a ``None`` decision and re-evaluates at that loop
time even if no event arrives. Policies without ``wake_at`` are only re-evaluated on events.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.placement import least_finish_time
from scheduler_svc.requests import ScheduledRequest


@dataclass(frozen=True, slots=True)
class RankView:
    """What a policy sees of one attention rank."""

    healthy: bool
    free_slots: int
    """In-flight batches the rank can still take."""
    predicted_load_ms: float
    """Predicted remaining work already on the rank (never negative)."""
    idle: bool = True
    """No batch is running on the rank."""


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """Send ``requests`` as one batch to ``rank``; ``predicted_ms`` is its predicted cost."""

    rank: int
    requests: list[ScheduledRequest]
    predicted_ms: float


class BatchPolicy(Protocol):
    """Decides the next batch. Called by the dispatcher whenever something changed; ``None`` = wait."""

    def next_batch(
        self, pending: Iterable[ScheduledRequest], ranks: Sequence[RankView], now: float
    ) -> BatchDecision | None: ...


class WakingBatchPolicy(BatchPolicy, Protocol):
    """A policy that may wait for a time to pass, not only for an event."""

    def wake_at(self, pending: Sequence[ScheduledRequest], now: float) -> float | None:
        """Loop time at which the dispatcher must call ``next_batch`` again although nothing happened;
        ``None`` = only on events (arrival, finished batch, rank up). Asked after ``next_batch`` returned
        ``None`` for the same ``pending`` and ``now``; never returns a time ``<= now``."""
        ...


def next_wake(policy: BatchPolicy, pending: Sequence[ScheduledRequest], now: float) -> float | None:
    """``policy.wake_at(pending, now)`` for a policy that has one, else ``None`` (re-evaluate on events)."""
    wake_at = getattr(policy, "wake_at", None)
    if wake_at is None:
        return None
    when: float | None = wake_at(pending, now)
    return when


def place_batch(
    config: SchedulerConfig, batch: list[ScheduledRequest], ranks: Sequence[RankView]
) -> BatchDecision | None:
    """Send ``batch`` to the free healthy rank with the least predicted finish time (its remaining work
    plus this batch's cost); ``None`` when no rank is free or the batch is empty."""
    solo = sum(request.prompt_tokens for request in batch) > config.dual_batch_max_tokens
    # Dual-batch interleaving is off above the threshold: such a batch only goes to an idle rank.
    available = [view.healthy and view.free_slots > 0 and (view.idle or not solo) for view in ranks]
    if not batch or not any(available):
        return None
    cost = config.cost.batch_ms([request.prompt_tokens for request in batch])
    rank = least_finish_time([view.predicted_load_ms + cost for view in ranks], available)
    return BatchDecision(rank=rank, requests=batch, predicted_ms=cost)


def take_fifo(
    pending: Iterable[ScheduledRequest], max_tokens: int, max_prompts: int
) -> list[ScheduledRequest]:
    """The longest prefix of ``pending`` within both bounds; a first prompt over ``max_tokens`` goes alone.

    Strict FIFO (no skipping ahead to fill the batch), so a long prompt is never starved by short ones.
    """
    batch: list[ScheduledRequest] = []
    tokens = 0
    for request in pending:
        if len(batch) >= max_prompts:
            break
        if batch and tokens + request.prompt_tokens > max_tokens:
            break
        batch.append(request)
        tokens += request.prompt_tokens
        if tokens >= max_tokens:
            break
    return batch


class AsyncBatchPolicy:
    """Async mode: as soon as a healthy rank has a free slot, form a FIFO batch and send it to the free
    rank with the least predicted finish time (its remaining work plus this batch's cost)."""

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config

    def next_batch(
        self, pending: Iterable[ScheduledRequest], ranks: Sequence[RankView], now: float
    ) -> BatchDecision | None:
        if not any(view.healthy and view.free_slots > 0 for view in ranks):
            return None
        batch = take_fifo(pending, self._config.max_batch_tokens, self._config.max_batch_prompts)
        return place_batch(self._config, batch, ranks)
