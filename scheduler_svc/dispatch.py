"""Dispatch: the task that takes pending requests off the core's queue and runs them on attention ranks.

One ``Dispatcher`` per scheduling mode, chosen once when the core starts (``core.make_dispatcher``):
``AsyncDispatcher`` here (async mode: a batch goes as soon as a rank has a free slot) and
``sync.SyncDispatcher`` (the sync baselines: global steps). A dispatcher sees the core only through
``CoreHandle``, the core's small public API (its queue, its rank table, its client, how to report a rank
down, fail the queue or signal progress, and how to sleep until something changes), never its private
state, and does not import the core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from asap import clock
from asap.errors import AsapError, InternalError, Unavailable
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.placement import BatchDecision
from scheduler_svc.policy import BatchPolicy, next_wake
from scheduler_svc.ranks import RankBatch, RankClient, RankTable
from scheduler_svc.requests import RankResultItem, RequestQueue, RequestResult

logger = logging.getLogger(__name__)


class CoreHandle(Protocol):
    """What a dispatcher uses of the scheduler core (``SchedulerCore`` implements it)."""

    @property
    def config(self) -> SchedulerConfig: ...

    @property
    def queue(self) -> RequestQueue:
        """Requests waiting to be placed; a dispatcher removes those it places."""
        ...

    @property
    def ranks(self) -> RankTable:
        """Health of every rank and the batches placed on it; a dispatcher opens and closes its batches."""
        ...

    @property
    def client(self) -> RankClient: ...

    def mark_rank_down(self, rank: int, reason: str) -> None:
        """Take ``rank`` out of placement; the requests of its batches in flight fail with ``Unavailable``."""
        ...

    def fail_pending(self, error: AsapError) -> None:
        """Fail every queued request (and what the dispatcher holds) with ``error``."""
        ...

    def progress(self) -> None:
        """Something finished or left: wake the dispatcher, and a draining ``stop`` once all is done."""
        ...

    async def wait_for_change(self, until: float | None = None) -> None:
        """Sleep until something changes (an arrival, a finished batch, a rank up) or loop time ``until``."""
        ...


class Dispatcher(Protocol):
    """Forms batches from the core's queue and runs them on the ranks."""

    async def run(self) -> None:
        """The dispatcher task: runs until cancelled (``SchedulerCore.stop``), then cancels its batches."""
        ...

    @property
    def holding(self) -> bool:
        """It holds requests that are neither queued nor in a batch on a rank (chunked prompts between
        steps), so the core is not idle yet."""
        ...

    def fail_held(self, error: AsapError) -> None:
        """Fail what ``holding`` counts: the core is failing its queue (no healthy rank, shutdown)."""
        ...


class AsyncDispatcher:
    """Async mode: whenever the policy forms a batch it goes to its rank at once, in a task of its own.

    Nothing waits on a rank (a batch is placed only on a free slot), so a rank going down leaves nothing
    to re-place: the requests of its batches in flight fail, pending ones go to the healthy ranks.
    """

    def __init__(self, core: CoreHandle, policy: BatchPolicy) -> None:
        self._core = core
        self.policy = policy
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def holding(self) -> bool:
        return False  # every request is either queued or in a batch of the rank table

    def fail_held(self, error: AsapError) -> None:
        return None

    async def run(self) -> None:
        core = self._core
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    now = loop.time()
                    # Expired requests are skipped here; their own ``submit`` withdraws and fails them.
                    live = core.queue.live(now)
                    config = core.config
                    views = core.ranks.views(config.max_inflight_per_rank, now, config.dual_batch_max_tokens)
                    decision = self.policy.next_batch(live, views, now)
                    # A policy holding a batch (min-size batching) names when to look again.
                    wake = next_wake(self.policy, live, now) if decision is None else None
                except Exception as exc:  # a policy bug must not wedge every queued request
                    logger.exception("batch policy failed")
                    core.fail_pending(InternalError(f"batch policy failed: {exc!r}"))
                    decision, wake = None, None
                if decision is None:
                    await core.wait_for_change(wake)
                else:
                    self._launch(decision)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _launch(self, decision: BatchDecision) -> None:
        core = self._core
        core.queue.remove(decision.requests)
        batch = core.ranks.open_batch(decision.rank, decision.requests, decision.predicted_ms)
        task = asyncio.create_task(self._run_batch(batch), name=f"asap-batch-{batch.batch_id}")
        batch.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: RankBatch) -> None:
        core = self._core
        try:
            # Requests withdrawn (cancelled, timed out) since the batch was formed are not sent.
            batch.requests = [r for r in batch.requests if r.waiting]
            if not batch.requests:
                return
            batch.predicted_ms = core.config.cost.batch_ms([r.prompt_tokens for r in batch.requests])
            batch.sent = clock.monotonic()
            for request in batch.requests:
                request.end_queue_span()
            try:
                outcomes = await core.client.run_batch(batch.rank, batch.batch_id, batch.requests)
            except Unavailable as exc:
                core.ranks.close_batch(batch)  # before the rank goes down, which cancels its batches' tasks
                batch.settle_all(exc)
                core.mark_rank_down(batch.rank, exc.message)
            except AsapError as exc:
                batch.settle_all(exc)
            except Exception as exc:
                logger.exception("batch %d on rank %d failed", batch.batch_id, batch.rank)
                batch.settle_all(InternalError(f"batch failed on rank {batch.rank}: {exc!r}"))
            else:
                _deliver(batch, outcomes)
        finally:
            core.ranks.close_batch(batch)
            core.progress()


def _deliver(batch: RankBatch, outcomes: Sequence[RankResultItem | AsapError | None]) -> None:
    if len(outcomes) != len(batch.requests):
        message = f"rank {batch.rank} returned {len(outcomes)} results for {len(batch.requests)} prompts"
        batch.settle_all(InternalError(message))
        return
    done = clock.monotonic()
    sent = batch.sent if batch.sent is not None else done
    for request, outcome in zip(batch.requests, outcomes, strict=True):
        if outcome is None:  # only chunked (sync) batches report partial progress
            request.settle(InternalError(f"rank {batch.rank} reported a partial result for a whole prompt"))
        elif isinstance(outcome, AsapError):
            request.settle(outcome)
        else:
            request.settle(RequestResult.of(request, outcome, batch.rank, sent, done))
