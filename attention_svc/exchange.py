"""One MoE layer's exchange with the expert ranks, on the per-layer (event-loop) path.

The executor (``attention_svc.core``) awaits one exchange per expert rank the layer routes to; the first
failure cancels the others, so a batch never leaves calls running behind it. The sync modes talk to every
expert rank at every layer, with empty dispatches where nothing routes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from asap import clock
from asap.dataplane.plane import ExchangeResult
from asap.errors import InternalError
from asap.model.placement import RankDispatch
from asap.syncstep import SyncStep
from asap.telemetry import spans
from attention_svc.batch import BatchOutcome

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from asap.model.config import ModelConfig


class ExpertTransport(Protocol):
    """How an attention rank reaches expert ranks (one link per expert rank, each over its data plane,
    ``asap.dataplane.plane.DataPlane``)."""

    def exchange(
        self,
        rank: int,
        micro_batch: int,
        layer: int,
        dispatch: RankDispatch,
        *,
        sync: SyncStep | None = None,
        trace: Context | None = None,
    ) -> Awaitable[ExchangeResult]:
        """Send one dispatch to expert rank ``rank``; return its combined partial result [n, H] (a
        coroutine, or a future: the simulator's in-process planes run an exchange as loop callbacks).

        ``sync`` marks a step of the sync modes: the expert rank waits for the dispatches of its
        ``participants`` attention ranks for (step, ``layer``) before computing, and ``dispatch`` may have
        0 rows.
        ``trace`` (tracing on): the batch's context, parent of the ``attention.dispatch`` span whose
        context travels in the chunks.
        """
        ...


async def exchange_all(
    transport: ExpertTransport,
    outcome: BatchOutcome,
    layer: int,
    dispatches: list[RankDispatch],
    sync: SyncStep | None,
    trace: Context | None,
) -> list[torch.Tensor]:
    """One layer's exchanges with every expert rank it needs; the waits are added to ``outcome``."""
    micro_batch = outcome.micro_batch
    started_ns = time.time_ns() if trace is not None else 0
    waited = clock.monotonic_ns()
    results = await all_or_cancel(
        [transport.exchange(d.rank, micro_batch, layer, d, sync=sync, trace=trace) for d in dispatches]
    )
    outcome.expert_wait_ns += clock.monotonic_ns() - waited
    outcome.barrier_wait_ns += max((r.barrier_ns for r in results), default=0)
    if trace is not None:
        attributes = {spans.LAYER: layer, spans.MICRO_BATCH: micro_batch}
        spans.record(spans.ATTENTION_COMBINE_WAIT, trace, started_ns, time.time_ns(), attributes)
    return [r.hidden for r in results]


def with_empty_dispatches(
    present: list[RankDispatch], num_ranks: int, cfg: ModelConfig, dtype: torch.dtype
) -> list[RankDispatch]:
    """``present`` plus an empty dispatch for every other of the ``num_ranks`` expert ranks (sync mode
    talks to all of them), in rank order."""
    have = {d.rank for d in present}
    empty = [
        RankDispatch(
            rank=rank,
            rows=torch.zeros(0, dtype=torch.int64),
            hidden=torch.zeros(0, cfg.hidden_size, dtype=dtype),
            expert_ids=torch.zeros(0, cfg.top_k, dtype=torch.int32),
            weights=torch.zeros(0, cfg.top_k, dtype=torch.float32),
        )
        for rank in range(num_ranks)
        if rank not in have
    ]
    return sorted([*present, *empty], key=lambda d: d.rank)


async def all_or_cancel(calls: Sequence[Awaitable[ExchangeResult]]) -> list[ExchangeResult]:
    """Await all calls; on the first failure cancel the rest and raise it.

    What ``asyncio.wait(..., return_when=FIRST_EXCEPTION)`` does for this, in the same loop steps (each
    finished call's completion callback, then this coroutine's wake-up once all are done or one failed),
    without what a layer's 16-32 exchanges pay in it per call: the set of calls, the checks for bare
    coroutines, the removal of every completion callback afterwards."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    if not tasks:
        raise ValueError("Set of Tasks/Futures is empty.")  # as asyncio.wait
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    left = len(tasks)

    def finished(task: asyncio.Future[ExchangeResult]) -> None:
        nonlocal left
        left -= 1
        if (left <= 0 or (not task.cancelled() and task.exception() is not None)) and not waiter.done():
            waiter.set_result(None)

    try:
        for task in tasks:
            task.add_done_callback(finished)
        await waiter
        for task in tasks:
            if task.done():
                exc = task.exception()
                if exc is not None:
                    raise exc
        if not all(task.done() for task in tasks):
            raise InternalError("expert exchange finished with pending calls")
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
