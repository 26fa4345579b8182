"""The scheduler core: admission, per-request queueing, rank health, results.

Pure asyncio, no grpc: the glue in ``server.py`` supplies a ``RankClient`` (the ``Attention.Run`` streams)
and maps requests and errors to and from the wire. Forming batches and running them is the job of the
mode's ``Dispatcher`` (``scheduler_svc.dispatch``, ``scheduler_svc.sync``), which uses the core's public
API only (``CoreHandle``). Everything is event-driven: the dispatcher sleeps until arrivals, finished
batches and rank-up notices wake it.

Rank failure: the batches in flight on a rank that goes down have been sent and may have started, so their
requests fail with ``Unavailable`` (the client may retry; prefill has no side effects). When no rank is
healthy, pending and new requests fail with ``Unavailable`` rather than wait for an unknown time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from asap import clock
from asap.errors import (
    AsapError,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from asap.modes import CHUNKED_MODE
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.dispatch import AsyncDispatcher, CoreHandle, Dispatcher
from scheduler_svc.minbatch import MinBatchPolicy
from scheduler_svc.policy import AsyncBatchPolicy, BatchPolicy
from scheduler_svc.ranks import RankClient, RankTable
from scheduler_svc.requests import (
    ClusterSnapshot,
    RankResultItem,
    RankSnapshot,
    RequestQueue,
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
    "make_dispatcher",
]

logger = logging.getLogger(__name__)


def make_dispatcher(core: CoreHandle) -> Dispatcher:
    """The dispatcher of ``core.config.mode``: async (its batch policy: min-size batching when
    ``min_batch_tokens`` is set) or the global steps of ``sync`` / ``sync-chunked``."""
    config = core.config
    if config.mode == "async":
        policy: BatchPolicy = (
            MinBatchPolicy(config, config.min_batch_tokens, max_wait_ms=config.max_wait_ms)
            if config.min_batch_tokens > 0
            else AsyncBatchPolicy(config)
        )
        return AsyncDispatcher(core, policy)
    return SyncDispatcher(core, config.chunk_tokens if config.mode == CHUNKED_MODE else None)


class SchedulerCore:
    """Admits requests and hands them to its dispatcher, which batches them and places the batches on
    attention ranks by predicted finish time. Implements ``CoreHandle`` for that dispatcher.

    Lifecycle: ``await start()`` ... ``await stop()`` (or ``async with``); ``stop`` is idempotent.
    """

    def __init__(self, config: SchedulerConfig, num_ranks: int, client: RankClient) -> None:
        self._config = config
        self._client = client
        self._ranks = RankTable(num_ranks)
        self._queue = RequestQueue()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        """The mode's dispatcher, from ``start`` on."""
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._stopped = False
        self._completed = self._failed = self._cancelled = 0

    async def __aenter__(self) -> SchedulerCore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @property
    def queue(self) -> RequestQueue:
        return self._queue

    @property
    def ranks(self) -> RankTable:
        return self._ranks

    @property
    def client(self) -> RankClient:
        return self._client

    def set_cost_model(self, cost: AttentionCostModel) -> None:
        """Predict batch times with ``cost`` (the model fitted on the ranks at start-up). Only before
        ``start``: every placement of a running core is priced with one model."""
        if self.dispatcher is not None or self._stopped:
            raise InternalError("the cost model is set before the scheduler core starts")
        self._config = dataclasses.replace(self._config, cost=cost)

    async def start(self) -> None:
        """Start the dispatcher. Calling it again while running does nothing; a stopped core stays stopped."""
        if self._stopped:
            raise Unavailable("the scheduler core was stopped and cannot be restarted")
        if self.dispatcher is None:
            self._accepting = True
            self.dispatcher = make_dispatcher(self)
            self._task = asyncio.create_task(self.dispatcher.run(), name="asap-scheduler-dispatch")
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
        self.fail_pending(error)
        for rank in range(len(self._ranks)):
            self._ranks.abort(rank, error)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
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
        if not self._ranks.any_healthy():
            raise Unavailable(f"no healthy attention rank among {len(self._ranks)}")
        if len(self._queue) >= self._config.max_queue_requests:
            raise ResourceExhausted(f"{len(self._queue)} requests already waiting (max_queue_requests)")
        loop = asyncio.get_running_loop()
        if request.deadline is not None and request.deadline <= loop.time():
            self._failed += 1
            raise DeadlineExceeded(f"request {request.request_id!r} arrived after its deadline")
        future: asyncio.Future[RequestResult] = loop.create_future()
        request._future = future
        self._queue.push(request)
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
        if self._ranks.set_down(rank, reason):
            logger.warning("attention rank %d down: %s", rank, reason)
        self._ranks.abort(rank, Unavailable(f"attention rank {rank} is down: {reason}"))
        if not self._ranks.any_healthy():
            self.fail_pending(Unavailable(f"no healthy attention rank among {len(self._ranks)}"))
        self.progress()

    def mark_rank_up(self, rank: int) -> None:
        """Make ``rank`` eligible for placements again."""
        if self._ranks.set_up(rank):
            logger.info("attention rank %d up", rank)
        self._wake.set()

    def is_healthy(self, rank: int) -> bool:
        """Whether ``rank`` takes placements (``RankTable`` holds the one record of rank health)."""
        return self._ranks.is_healthy(rank)

    def state(self) -> ClusterSnapshot:
        """A point-in-time snapshot of queues, ranks and counters."""
        return ClusterSnapshot(
            mode=self._config.mode,
            ranks=self._ranks.snapshots(clock.monotonic()),
            pending_requests=len(self._queue),
            completed=self._completed,
            failed=self._failed,
            cancelled=self._cancelled,
        )

    def fail_pending(self, error: AsapError) -> None:
        """Fail every queued request, and what the dispatcher holds, with ``error``."""
        self._queue.fail_all(error)
        if self.dispatcher is not None:
            self.dispatcher.fail_held(error)

    def progress(self) -> None:
        """Something finished or left: wake the dispatcher, and a draining ``stop`` when all is done."""
        self._wake.set()
        if self._is_idle():
            self._idle.set()

    async def wait_for_change(self, until: float | None = None) -> None:
        """Sleep until something changes (an arrival, a finished batch, a rank up) or loop time ``until``."""
        self._wake.clear()
        timer = asyncio.get_running_loop().call_at(until, self._wake.set) if until is not None else None
        try:
            await self._wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _withdraw(self, request: ScheduledRequest) -> None:
        self._queue.remove([request])
        if request._future is not None:
            request._future.cancel()  # no-op when already done
        self.progress()

    def _is_idle(self) -> bool:
        holding = self.dispatcher is not None and self.dispatcher.holding
        return not self._queue and not holding and not self._ranks.busy
