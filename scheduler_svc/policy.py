"""Batch policies of the async mode: which pending requests form the next batch, and when it goes.

The async dispatcher (``scheduler_svc.dispatch``) owns the loop, the tasks and failure handling; a policy
only decides, and leaves the choice of rank to ``placement.place_batch``. ``AsyncBatchPolicy`` sends a
FIFO batch as soon as a rank has a free slot; ``MinBatchPolicy`` (``scheduler_svc.minbatch``) holds it
until it is large enough. The sync modes have no policy: their global steps are planned by
``scheduler_svc.steps``.

A policy that holds requests until a time passes (min-size batching's wait bound) also implements
``wake_at``; the dispatcher asks ``next_wake`` after a ``None`` decision and re-evaluates at that loop
time even if no event arrives. Policies without ``wake_at`` are only re-evaluated on events.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.placement import BatchDecision, RankView, place_batch
from scheduler_svc.requests import ScheduledRequest


class BatchPolicy(Protocol):
    """Decides the next batch. Called by the dispatcher whenever something changed; ``None`` = wait."""

    def next_batch(
        self, pending: Iterable[ScheduledRequest], ranks: Sequence[RankView], now: float
    ) -> BatchDecision | None: ...


def next_wake(policy: BatchPolicy, pending: Sequence[ScheduledRequest], now: float) -> float | None:
    """``policy.wake_at(pending, now)`` for a policy that has one, else ``None`` (re-evaluate on events).

    ``wake_at(pending, now)`` names the loop time at which the dispatcher must call ``next_batch`` again
    although nothing happened (``None``: only on events: an arrival, a finished batch, a rank up). It is
    asked after ``next_batch`` returned ``None`` for the same ``pending`` and ``now``, and never returns a
    time ``<= now``.
    """
    wake_at = getattr(policy, "wake_at", None)
    if wake_at is None:
        return None
    when: float | None = wake_at(pending, now)
    return when


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
