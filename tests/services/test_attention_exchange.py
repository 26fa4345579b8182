"""One layer's expert exchange of an attention rank (``attention_svc.exchange``), without a model."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import attention_svc.core
from asap.dataplane.plane import ExchangeResult
from asap.errors import Unavailable
from asap.model.placement import RankDispatch
from attention_svc import batch, exchange
from attention_svc.batch import BatchOutcome
from attention_svc.exchange import all_or_cancel, exchange_all, with_empty_dispatches


def _dispatch(rank: int, rows: int = 2, hidden: int = 4, top_k: int = 2) -> RankDispatch:
    return RankDispatch(
        rank=rank,
        rows=torch.arange(rows, dtype=torch.int64),
        hidden=torch.ones(rows, hidden),
        expert_ids=torch.zeros(rows, top_k, dtype=torch.int32),
        weights=torch.ones(rows, top_k),
    )


async def test_the_first_failure_is_raised_and_the_other_calls_are_cancelled() -> None:
    cancelled = asyncio.Event()

    async def slow() -> ExchangeResult:
        try:
            await asyncio.Event().wait()  # never set: only a cancel ends it
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def failing() -> ExchangeResult:
        await asyncio.sleep(0)
        raise Unavailable("expert rank 1 is gone")

    with pytest.raises(Unavailable, match="rank 1"):
        await all_or_cancel([slow(), failing()])
    await asyncio.wait_for(cancelled.wait(), timeout=5)
    assert cancelled.is_set()


async def test_cancelling_the_wait_cancels_every_call() -> None:
    """The batch cancelled while its layer waits: no call is left running behind it."""
    started, cancelled = asyncio.Event(), []

    async def waits(name: str) -> ExchangeResult:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise
        raise AssertionError("unreachable")

    waiting = asyncio.ensure_future(all_or_cancel([waits("a"), waits("b")]))
    await started.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(3):
        await asyncio.sleep(0)
    assert sorted(cancelled) == ["a", "b"]


async def test_results_come_in_the_order_of_the_calls() -> None:
    async def answer(value: float, yields: int) -> ExchangeResult:
        for _ in range(yields):
            await asyncio.sleep(0)
        return ExchangeResult(torch.full((1, 1), value))

    results = await all_or_cancel([answer(1.0, 3), answer(2.0, 0)])
    assert [float(r.hidden) for r in results] == [1.0, 2.0]


class _Transport:
    def __init__(self, barrier_ns: dict[int, int]) -> None:
        self.barrier_ns = barrier_ns
        self.calls: list[tuple[int, int, int]] = []

    async def exchange(
        self, rank: int, micro_batch: int, layer: int, dispatch: RankDispatch, **_: Any
    ) -> ExchangeResult:
        self.calls.append((rank, micro_batch, layer))
        return ExchangeResult(dispatch.hidden * (rank + 1), barrier_ns=self.barrier_ns[rank])


async def test_a_layer_exchange_adds_the_longest_barrier_wait_to_the_outcome() -> None:
    transport = _Transport({0: 5, 2: 9})
    outcome = BatchOutcome(results=[], micro_batch=7, barrier_wait_ns=1)
    partials = await exchange_all(transport, outcome, 3, [_dispatch(0), _dispatch(2)], None, None)
    assert transport.calls == [(0, 7, 3), (2, 7, 3)]
    assert [float(p[0, 0]) for p in partials] == [1.0, 3.0]
    assert outcome.barrier_wait_ns == 1 + 9


def test_empty_dispatches_fill_in_every_missing_rank_in_rank_order() -> None:
    cfg: Any = SimpleNamespace(hidden_size=4, top_k=2)
    present = [_dispatch(2), _dispatch(0)]
    out = with_empty_dispatches(present, 4, cfg, torch.bfloat16)
    assert [d.rank for d in out] == [0, 1, 2, 3]
    assert out[0] is present[1] and out[2] is present[0]
    for empty in (out[1], out[3]):
        assert empty.hidden.shape == (0, 4) and empty.hidden.dtype == torch.bfloat16
        assert empty.expert_ids.shape == (0, 2) and empty.expert_ids.dtype == torch.int32
        assert empty.weights.shape == (0, 2) and empty.rows.numel() == 0


def test_the_executor_module_still_exports_the_batch_types() -> None:
    core = attention_svc.core
    assert core.PromptSpec is batch.PromptSpec and core.PromptOutcome is batch.PromptOutcome
    assert core.BatchOutcome is batch.BatchOutcome and core.AttentionStats is batch.AttentionStats
    assert core.ExpertTransport is exchange.ExpertTransport
    assert set(core.__all__) <= set(vars(core))
