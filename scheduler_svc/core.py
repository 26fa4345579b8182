"""The scheduler core: admission, per-request queueing, batch dispatch to attention ranks, results.

Pure asyncio, no grpc: the glue in ``server.py`` supplies a ``RankClient`` (the ``Attention.Run`` streams)
and maps requests and errors to and from the wire. Everything is event-driven: the dispatcher sleeps on
an ``asyncio.Event`` that arrivals, finished batches and rank-up notices set.

Rank failure: the batches in flight on a rank that goes down have been sent and may have started, so their
requests fail with ``Unavailable`` (the client may retry; prefill has no side effects). Nothing waits on a
rank in async mode (a batch is placed only on a free slot), so there is nothing to re-place; pending
requests simply go to the healthy ranks. When no rank is healthy, pending and new requests fail with
``Unavailable`` rather than wait for an unknown time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Sequence

from asap.errors import (
    AsapError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.minbatch import MinBatchPolicy
from scheduler_svc.policy import AsyncBatchPolicy, BatchDecision, BatchPolicy, RankView, next_wake
from scheduler_svc.ranks import RankBatch, RankClient, RankState
from scheduler_svc.requests import (
    ClusterSnapshot,
    RankResultItem,
    RankSnapshot,
    RequestResult,
    ScheduledRequest,
)
from scheduler_svc.sync import SyncDispatcher

__all__ = [
    "ClusterSnapshot",
    "RankClient",
    "RankResultItem",
    "RankSnapshot",
    "RequestResult",
    "ScheduledRequest",
    "SchedulerCore",
]

logger = logging.getLogger(__name__)


class SchedulerCore:
    """Admits requests, batches them and places batches on attention ranks by predicted finish time.

    Lifecycle: ``await start()`` ... ``await stop()`` (or ``async with``); ``stop`` is idempotent.
    """

    def __init__(
        self, config: SchedulerConfig, num_ranks: int, client: RankClient, policy: BatchPolicy | None = None
    ) -> None:
        if num_ranks < 1:
            raise InvalidArgument(f"num_ranks must be >= 1, got {num_ranks}")
        self._config = config
        self._client = client
        if policy is None:
            policy = (
                MinBatchPolicy(config, config.min_batch_tokens, max_wait_ms=config.max_wait_ms)
                if config.min_batch_tokens > 0
                else AsyncBatchPolicy(config)
            )
        self._policy: BatchPolicy = policy
        self._ranks = [RankState() for _ in range(num_ranks)]
        self._pending: dict[ScheduledRequest, None] = {}  # insertion-ordered set: the FIFO queue
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._batch_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._accepting = False
        self._stopped = False
        self._completed = self._failed = self._cancelled = 0
        self._sync: SyncDispatcher | None = None
        """The global-step dispatcher in the sync modes."""

    async def __aenter__(self) -> SchedulerCore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the dispatcher. Calling it again while running does nothing; a stopped core stays stopped."""
        if self._stopped:
            raise Unavailable("the scheduler core was stopped and cannot be restarted")
        if self._dispatcher is None:
            self._accepting = True
            if self._config.mode == "async":
                loop_coro = self._dispatch_loop()
            else:
                chunk = self._config.chunk_tokens if self._config.mode == "sync-chunked" else None
                self._sync = SyncDispatcher(self, chunk)
                loop_coro = self._sync.run()
            self._dispatcher = asyncio.create_task(loop_coro, name="asap-scheduler-dispatch")
            logger.info("scheduler core started: mode=%s ranks=%d", self._config.mode, len(self._ranks))

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new requests, let queued and running work finish for up to ``drain_timeout_s``, then fail
        what is left with ``Unavailable`` and cancel and await every task. Safe to call twice."""
        if self._stopped:  # set before draining, so a concurrent second call returns at once
            return
        self._stopped, self._accepting = True, False
        if drain_timeout_s > 0 and not self._is_idle():
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except TimeoutError:
                logger.warning("scheduler drain timed out after %.1f s", drain_timeout_s)
        error = Unavailable("the scheduler is shutting down")
        self._fail_pending(error)
        for state in self._ranks:
            self._abort_batches(state, error)
        tasks = [*self._tasks, *([self._dispatcher] if self._dispatcher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        logger.info("scheduler core stopped")

    async def submit(self, request: ScheduledRequest) -> RequestResult:
        """Queue ``request`` and wait for its result.

        Raises ``InvalidArgument`` (empty prompt, submitted twice), ``Unavailable`` (not running, no healthy
        rank, its rank went down), ``ResourceExhausted`` (``max_queue_requests`` already waiting),
        ``DeadlineExceeded`` (its deadline passed: it leaves the queue, or its result is dropped), or the
        per-request error from its rank. If the caller is cancelled, the request leaves the queue (a batch
        not yet sent will not carry it) and ``CancelledError`` propagates.
        """
        if not request.token_ids:
            raise InvalidArgument(f"request {request.request_id!r} has an empty prompt")
        if request._future is not None:
            raise InvalidArgument(f"request {request.request_id!r} was already submitted")
        if not self._accepting:
            raise Unavailable("the scheduler is not accepting requests")
        if not any(state.healthy for state in self._ranks):
            raise Unavailable(f"no healthy attention rank among {len(self._ranks)}")
        if len(self._pending) >= self._config.max_queue_requests:
            raise ResourceExhausted(f"{len(self._pending)} requests already waiting (max_queue_requests)")
        loop = asyncio.get_running_loop()
        if request.deadline is not None and request.deadline <= loop.time():
            self._failed += 1
            raise DeadlineExceeded(f"request {request.request_id!r} arrived after its deadline")
        future: asyncio.Future[RequestResult] = loop.create_future()
        request._future = future
        self._pending[request] = None
        self._wake.set()
        try:
            async with asyncio.timeout_at(request.deadline):
                result = await future
        except TimeoutError:
            self._withdraw(request)
            self._failed += 1
            raise DeadlineExceeded(f"request {request.request_id!r} passed its deadline") from None
        except asyncio.CancelledError:
            self._withdraw(request)
            self._cancelled += 1
            raise
        except AsapError:
            self._failed += 1
            raise
        self._completed += 1
        return result

    def mark_rank_down(self, rank: int, reason: str) -> None:
        """Take ``rank`` out of placement; requests of its in-flight batches fail with ``Unavailable``."""
        state = self._rank(rank)
        if state.healthy:
            logger.warning("attention rank %d down: %s", rank, reason)
        state.healthy, state.down_reason = False, reason
        self._abort_batches(state, Unavailable(f"attention rank {rank} is down: {reason}"))
        if not any(s.healthy for s in self._ranks):
            self._fail_pending(Unavailable(f"no healthy attention rank among {len(self._ranks)}"))
        self._progress()

    def mark_rank_up(self, rank: int) -> None:
        """Make ``rank`` eligible for placements again."""
        state = self._rank(rank)
        if not state.healthy:
            logger.info("attention rank %d up", rank)
        state.healthy, state.down_reason = True, ""
        self._wake.set()

    def state(self) -> ClusterSnapshot:
        """A point-in-time snapshot of queues, ranks and counters."""
        now = time.monotonic()
        return ClusterSnapshot(
            mode=self._config.mode,
            ranks=[state.snapshot(index, now) for index, state in enumerate(self._ranks)],
            pending_requests=len(self._pending),
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
        )

    def _rank(self, rank: int) -> RankState:
        if not 0 <= rank < len(self._ranks):
            raise InvalidArgument(f"attention rank {rank} outside 0..{len(self._ranks) - 1}")
        return self._ranks[rank]

    def _views(self) -> list[RankView]:
        now = time.monotonic()
        solo = self._config.dual_batch_max_tokens
        return [state.view(self._config.max_inflight_per_rank, now, solo) for state in self._ranks]

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                now = loop.time()
                # Expired requests are skipped here; their own ``submit`` withdraws and fails them.
                live = [r for r in self._pending if r.deadline is None or r.deadline > now]
                decision = self._policy.next_batch(live, self._views(), now)
                # A policy holding a batch (min-size batching) names when to look again.
                wake = next_wake(self._policy, live, now) if decision is None else None
            except Exception as exc:  # a policy bug must not wedge every queued request
                logger.exception("batch policy failed")
                self._fail_pending(InternalError(f"batch policy failed: {exc!r}"))
                decision, wake = None, None
            if decision is None:
                self._wake.clear()
                timer = loop.call_at(wake, self._wake.set) if wake is not None else None
                try:
                    await self._wake.wait()
                finally:
                    if timer is not None:
                        timer.cancel()
            else:
                self._launch(decision)

    def _launch(self, decision: BatchDecision) -> None:
        batch = RankBatch(next(self._batch_ids), decision.rank, decision.requests, decision.predicted_ms)
        for request in batch.requests:
            del self._pending[request]
        self._ranks[batch.rank].batches[batch.batch_id] = batch
        task = asyncio.create_task(self._run_batch(batch), name=f"asap-batch-{batch.batch_id}")
        batch.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch: RankBatch) -> None:
        state = self._ranks[batch.rank]
        try:
            # Requests withdrawn (cancelled, timed out) since the batch was formed are not sent.
            batch.requests = [r for r in batch.requests if r.waiting]
            if not batch.requests:
                return
            batch.predicted_ms = self._config.cost.batch_ms([r.prompt_tokens for r in batch.requests])
            batch.sent = time.monotonic()
            for request in batch.requests:
                request.end_queue_span()
            try:
                outcomes = await self._client.run_batch(batch.rank, batch.batch_id, batch.requests)
            except Unavailable as exc:
                state.batches.pop(batch.batch_id, None)
                self._settle_all(batch, exc)
                self.mark_rank_down(batch.rank, exc.message)
            except AsapError as exc:
                self._settle_all(batch, exc)
            except Exception as exc:
                logger.exception("batch %d on rank %d failed", batch.batch_id, batch.rank)
                self._settle_all(batch, InternalError(f"batch failed on rank {batch.rank}: {exc!r}"))
            else:
                self._deliver(batch, outcomes)
        finally:
            state.batches.pop(batch.batch_id, None)
            self._progress()

    def _deliver(self, batch: RankBatch, outcomes: Sequence[RankResultItem | AsapError | None]) -> None:
        if len(outcomes) != len(batch.requests):
            message = f"rank {batch.rank} returned {len(outcomes)} results for {len(batch.requests)} prompts"
            self._settle_all(batch, InternalError(message))
            return
        done = time.monotonic()
        sent = batch.sent if batch.sent is not None else done
        for request, outcome in zip(batch.requests, outcomes, strict=True):
            if outcome is None:  # only chunked (sync) batches report partial progress
                request.settle(
                    InternalError(f"rank {batch.rank} reported a partial result for a whole prompt")
                )
            elif isinstance(outcome, AsapError):
                request.settle(outcome)
            else:
                request.settle(RequestResult.of(request, outcome, batch.rank, sent, done))

    def _settle_all(self, batch: RankBatch, error: AsapError) -> None:
        for request in batch.requests:
            request.settle(error)

    def _abort_batches(self, state: RankState, error: AsapError) -> None:
        for batch in list(state.batches.values()):
            self._settle_all(batch, error)
            if batch.task is not None:
                batch.task.cancel()
        state.batches.clear()

    def _fail_pending(self, error: AsapError) -> None:
        for request in list(self._pending):
            request.settle(error)
        self._pending.clear()
        if self._sync is not None:
            self._sync.fail_in_progress(error)

    def _withdraw(self, request: ScheduledRequest) -> None:
        self._pending.pop(request, None)
        if request._future is not None:
            request._future.cancel()  # no-op when already done
        self._progress()

    def _progress(self) -> None:
        """Something finished or left: wake the dispatcher, and a draining ``stop`` when all is done."""
        self._wake.set()
        if self._is_idle():
            self._idle.set()

    def _is_idle(self) -> bool:
        chunked = self._sync is not None and bool(self._sync.in_progress)
        return not self._pending and not chunked and not any(state.batches for state in self._ranks)
