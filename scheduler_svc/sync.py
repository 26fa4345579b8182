"""The global-step dispatcher of the synchronous baselines (``sync`` and ``sync-chunked``).

Each step: plan every healthy rank's batch (``steps.plan_step``), send them all with the same step id
and participant count (the expert ranks then hold each layer until every rank's dispatch is in, the
barrier of DP+EP with all-to-all), wait for the slowest rank, deliver, repeat. A rank with nothing to do
still runs an empty batch, so it takes part in every layer's exchange, exactly as an idle DP rank does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from typing import TYPE_CHECKING

from asap.errors import AsapError, InternalError, Unavailable
from scheduler_svc.ranks import RankBatch
from scheduler_svc.requests import RankResultItem, RequestResult, ScheduledRequest
from scheduler_svc.steps import ChunkItem, InProgress, plan_step

if TYPE_CHECKING:
    from scheduler_svc.core import SchedulerCore

logger = logging.getLogger(__name__)


class SyncDispatcher:
    """Runs global steps for a ``SchedulerCore`` in a sync mode. ``run()`` is the dispatcher task."""

    def __init__(self, core: SchedulerCore, chunk_tokens: int | None) -> None:
        self.core = core
        self.chunk_tokens = chunk_tokens
        self.in_progress: list[InProgress] = []
        self.steps = itertools.count(1)
        self._first_sent: dict[ScheduledRequest, float] = {}
        self._drops: dict[int, list[str]] = {}

    def fail_in_progress(self, error: AsapError) -> None:
        for item in self.in_progress:
            item.request.settle(error)
        self.in_progress.clear()

    def _forget_withdrawn(self) -> None:
        """Chunked prompts whose caller gave up: stop scheduling them and free their caches on the rank."""
        for item in list(self.in_progress):
            rank_up = self.core._ranks[item.rank].healthy
            if item.request.waiting and rank_up:
                continue
            self.in_progress.remove(item)
            self._first_sent.pop(item.request, None)
            if rank_up:
                self._drops.setdefault(item.rank, []).append(item.request.request_id)
            else:
                item.request.settle(Unavailable(f"attention rank {item.rank} holding its chunks is down"))

    async def run(self) -> None:
        core = self.core
        config = core._config
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._forget_withdrawn()
                healthy = [rank for rank, state in enumerate(core._ranks) if state.healthy]
                now = loop.time()
                live = [r for r in core._pending if r.deadline is None or r.deadline > now]
                plan = plan_step(
                    live,
                    self.in_progress,
                    healthy,
                    max_batch_tokens=config.max_batch_tokens,
                    max_batch_prompts=config.max_batch_prompts,
                    cost=config.cost,
                    chunk_tokens=self.chunk_tokens,
                )
            except Exception as exc:  # a planner bug must not silently wedge every queued request
                logger.exception("sync step planning failed")
                core._fail_pending(InternalError(f"sync step planning failed: {exc!r}"))
                continue
            if plan.empty:
                core._wake.clear()
                await core._wake.wait()
                continue
            sent = time.monotonic()
            for request in plan.started:
                core._pending.pop(request, None)
                self._first_sent[request] = sent
                request.end_queue_span()
            await self._run_step(next(self.steps), plan.batches, sent)
            core._progress()

    async def _run_step(self, step: int, batches: dict[int, list[ChunkItem]], sent: float) -> None:
        core = self.core
        participants = len(batches)
        registered: dict[int, RankBatch] = {}
        calls = {}
        for rank, items in batches.items():
            requests = [item.request for item in items]
            batch = RankBatch(
                next(core._batch_ids), rank, requests, core._config.cost.batch_ms([i.tokens for i in items])
            )
            batch.sent = sent
            core._ranks[rank].batches[batch.batch_id] = batch
            registered[rank] = batch
            calls[rank] = core._client.run_batch(
                rank,
                batch.batch_id,
                requests,
                step=step,
                participants=participants,
                chunks=[(item.start, item.end) for item in items] if self.chunk_tokens is not None else None,
                drop=self._drops.pop(rank, []),
            )
        outcomes = await asyncio.gather(*calls.values(), return_exceptions=True)
        done = time.monotonic()
        for (rank, items), outcome in zip(batches.items(), outcomes, strict=True):
            core._ranks[rank].batches.pop(registered[rank].batch_id, None)
            if isinstance(outcome, BaseException):
                self._fail_rank_items(rank, items, outcome)
                continue
            if len(outcome) != len(items):
                self._fail_rank_items(
                    rank, items, InternalError(f"rank {rank} answered {len(outcome)} of {len(items)}")
                )
                continue
            for item, result in zip(items, outcome, strict=True):
                self._deliver(rank, item, result, done)

    def _fail_rank_items(self, rank: int, items: list[ChunkItem], exc: BaseException) -> None:
        for item in items:
            self._first_sent.pop(item.request, None)
        error = exc if isinstance(exc, AsapError) else InternalError(f"step failed on rank {rank}: {exc!r}")
        if not isinstance(exc, AsapError):
            logger.error("sync step on rank %d failed: %r", rank, exc)
        for item in items:
            item.request.settle(error)
            self.in_progress = [p for p in self.in_progress if p.request is not item.request]
        if isinstance(error, Unavailable):
            self.core.mark_rank_down(rank, error.message)

    def _deliver(
        self, rank: int, item: ChunkItem, result: RankResultItem | AsapError | None, done: float
    ) -> None:
        request = item.request
        progress = next((p for p in self.in_progress if p.request is request), None)
        if isinstance(result, AsapError):
            request.settle(result)
        elif result is None:  # a chunk with more to come
            if progress is None:
                self.in_progress.append(InProgress(request, rank, item.end))
            else:
                progress.done = item.end
            return
        else:
            sent = self._first_sent.get(request, done)
            # The rank counts the tokens it was sent, the last chunk's only: report the whole prompt's.
            result = dataclasses.replace(result, prompt_tokens=request.prompt_tokens)
            request.settle(RequestResult.of(request, result, rank, sent, done))
        if progress is not None:
            self.in_progress.remove(progress)
        self._first_sent.pop(request, None)
