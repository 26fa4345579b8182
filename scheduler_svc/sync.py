"""The global-step dispatcher of the synchronous baselines (``sync`` and ``sync-chunked``).

Each step: plan every healthy rank's batch (``steps.plan_step``, or ``steps.plan_step_per_rank`` over the
per-rank queues a request-count balancer fills with ``SchedulerConfig.sync_planner`` ``per-rank``), send them all with the same
``SyncStep`` (step id and participant count; the expert ranks then hold each layer until every rank's
dispatch is in, the barrier of DP+EP with all-to-all), wait for the slowest rank, deliver, repeat. A rank with nothing to do
still runs an empty batch, so it takes part in every layer's exchange, exactly as an idle DP rank does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Sequence

from asap import clock
from asap.errors import AsapError, InternalError, Unavailable
from asap.syncstep import SyncStep
from scheduler_svc.dispatch import CoreHandle
from scheduler_svc.placement import balance_request
from scheduler_svc.ranks import RankBatch
from scheduler_svc.requests import FailedBatch, RankResultItem, RequestResult, ScheduledRequest
from scheduler_svc.steps import ChunkItem, InProgress, StepPlan, plan_step, plan_step_per_rank

logger = logging.getLogger(__name__)


class SyncDispatcher:
    """Runs global steps for a scheduler core in a sync mode (a ``Dispatcher``). ``run()`` is its task."""

    def __init__(self, core: CoreHandle, chunk_tokens: int | None) -> None:
        self._core = core
        self.chunk_tokens = chunk_tokens
        """``sync-chunked``: prompt tokens per rank and step; ``None`` in ``sync`` (whole prompts)."""
        self.in_progress: list[InProgress] = []
        """Chunked prompts part-way through, between steps: neither queued nor in a batch."""
        self._step_ids = itertools.count(1)
        self._first_sent: dict[ScheduledRequest, float] = {}
        self._drops: dict[int, list[str]] = {}
        self._home: dict[ScheduledRequest, int] = {}
        """``per-rank`` planner: the rank the front-end balancer gave each queued request."""
        self._running: dict[int, int] = {}
        """``per-rank`` planner: requests in each rank's last step (the balancer's running counts)."""

    @property
    def holding(self) -> bool:
        return bool(self.in_progress)

    def fail_held(self, error: AsapError) -> None:
        for item in self.in_progress:
            item.request.settle(error)
        self.in_progress.clear()

    def _forget_withdrawn(self) -> None:
        """Chunked prompts whose caller gave up: stop scheduling them and free their caches on the rank."""
        for item in list(self.in_progress):
            rank_up = self._core.ranks.is_healthy(item.rank)
            if item.request.waiting and rank_up:
                continue
            self.in_progress.remove(item)
            self._first_sent.pop(item.request, None)
            if rank_up:
                self._drops.setdefault(item.rank, []).append(item.request.request_id)
            else:
                item.request.settle(Unavailable(f"attention rank {item.rank} holding its chunks is down"))

    async def run(self) -> None:
        core = self._core
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._forget_withdrawn()
                plan = self._plan(core.queue.live(loop.time()), core.ranks.healthy_ranks())
            except Exception as exc:  # a planner bug must not silently wedge every queued request
                logger.exception("sync step planning failed")
                core.fail_pending(InternalError(f"sync step planning failed: {exc!r}"))
                continue
            if plan.empty:
                await core.wait_for_change()
                continue
            sent = clock.monotonic()
            core.queue.remove(plan.started)
            for request in plan.started:
                self._first_sent[request] = sent
                request.end_queue_span()
            await self._run_step(SyncStep(next(self._step_ids), len(plan.batches)), plan.batches, sent)
            core.progress()

    def _plan(self, pending: Sequence[ScheduledRequest], healthy: Sequence[int]) -> StepPlan:
        config = self._core.config
        if config.sync_planner == "lpt":
            return plan_step(
                pending,
                self.in_progress,
                healthy,
                max_batch_tokens=config.max_batch_tokens,
                max_batch_prompts=config.max_batch_prompts,
                cost=config.cost,
                chunk_tokens=self.chunk_tokens,
            )
        if not healthy:
            return StepPlan()
        plan = plan_step_per_rank(
            self._queues(pending, healthy),
            self.in_progress,
            healthy,
            max_batch_tokens=config.max_batch_tokens,
            max_batch_prompts=config.max_batch_prompts,
            chunk_tokens=self.chunk_tokens,
        )
        if not plan.empty:
            self._running = {rank: len(items) for rank, items in plan.batches.items()}
        return plan

    def _queues(
        self, pending: Sequence[ScheduledRequest], healthy: Sequence[int]
    ) -> dict[int, list[ScheduledRequest]]:
        """Each healthy rank's waiting queue, in arrival order. A request seen for the first time (or
        whose rank is down) goes to the rank ``balance_request`` picks from the counts then: the requests
        already waiting on each rank and those of its last step, as a front end that assigns at arrival
        sees them while that step runs (vLLM's balancer reads counts published every 100 ms instead)."""
        queues: dict[int, list[ScheduledRequest]] = {rank: [] for rank in healthy}
        homes: dict[ScheduledRequest, int] = {}
        for request in pending:
            rank = self._home.get(request)
            if rank is None or rank not in queues:
                rank = balance_request(
                    {r: len(q) for r, q in queues.items()}, {r: self._running.get(r, 0) for r in queues}
                )
            queues[rank].append(request)
            homes[request] = rank
        self._home = homes
        return queues

    async def _run_step(self, step: SyncStep, batches: dict[int, list[ChunkItem]], sent: float) -> None:
        """Run one step on every participant. A participant that leaves the step (its call failed, its
        whole batch failed, or it was taken down and its call cancelled) ends the step for all: the
        others are held at the expert ranks' barrier for dispatches that will never come, so their items
        fail with ``Unavailable`` at once, and the next step's dispatches release the barrier's stale
        groups (``expert_svc.barrier``), instead of a frozen rank holding the step for the barrier's
        timeout."""
        core = self._core
        registered: dict[int, RankBatch] = {}
        calls: dict[asyncio.Task[Sequence[RankResultItem | AsapError | None]], int] = {}
        for rank, items in batches.items():
            requests = [item.request for item in items]
            batch = core.ranks.open_batch(
                rank, requests, core.config.cost.batch_ms([i.tokens for i in items])
            )
            batch.sent = sent
            registered[rank] = batch
            task = asyncio.create_task(
                core.client.run_batch(
                    rank,
                    batch.batch_id,
                    requests,
                    sync=step,
                    chunks=[(item.start, item.end) for item in items]
                    if self.chunk_tokens is not None
                    else None,
                    drop=self._drops.pop(rank, []),
                ),
                name=f"sync-step-{step.step}-rank-{rank}",
            )
            batch.task = task  # cancelled when the rank is taken down
            calls[task] = rank
        pending = set(calls)
        left: int | None = None
        while pending and left is None:
            done_now, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done_now:
                if task.cancelled() or task.exception() is not None or isinstance(task.result(), FailedBatch):
                    left = calls[task]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        done = clock.monotonic()
        for task, rank in calls.items():
            items = batches[rank]
            core.ranks.close_batch(registered[rank])
            if task in pending:
                self._fail_rank_items(
                    rank,
                    items,
                    Unavailable(f"sync step {step.step}: attention rank {left} left the step"),
                    mark=False,  # this rank is fine; its step is not
                )
                continue
            if task.cancelled():
                # Taken down (the health monitor): its requests were failed already.
                self._fail_rank_items(rank, items, Unavailable(f"attention rank {rank} is down"), mark=False)
                continue
            exc = task.exception()
            if exc is not None:
                self._fail_rank_items(rank, items, exc)
                continue
            outcome = task.result()
            if len(outcome) != len(items):
                self._fail_rank_items(
                    rank, items, InternalError(f"rank {rank} answered {len(outcome)} of {len(items)}")
                )
                continue
            for item, result in zip(items, outcome, strict=True):
                self._deliver(rank, item, result, done)

    def _fail_rank_items(
        self, rank: int, items: list[ChunkItem], exc: BaseException, *, mark: bool = True
    ) -> None:
        for item in items:
            self._first_sent.pop(item.request, None)
        error = exc if isinstance(exc, AsapError) else InternalError(f"step failed on rank {rank}: {exc!r}")
        if not isinstance(exc, AsapError):
            logger.error("sync step on rank %d failed: %r", rank, exc)
        for item in items:
            item.request.settle(error)
            self.in_progress = [p for p in self.in_progress if p.request is not item.request]
        if mark and isinstance(error, Unavailable):
            self._core.mark_rank_down(rank, error.message)

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
