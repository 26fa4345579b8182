"""The Dispatcher of each mode, the cost model handed to the core, and the core's dispatcher API."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from asap.errors import AsapError, InternalError
from asap.syncstep import SyncStep
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.core import SchedulerCore, make_dispatcher
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.dispatch import AsyncDispatcher
from scheduler_svc.minbatch import MinBatchPolicy
from scheduler_svc.policy import AsyncBatchPolicy
from scheduler_svc.requests import RankResultItem, ScheduledRequest
from scheduler_svc.sync import SyncDispatcher


class EchoClient:
    """Answers every prompt; with ``gate`` each batch waits for it first (``sent`` is set meanwhile)."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.sent = asyncio.Event()

    async def run_batch(
        self,
        rank: int,
        batch_id: int,
        requests: Sequence[ScheduledRequest],
        *,
        sync: SyncStep | None = None,
        chunks: Sequence[tuple[int, int]] | None = None,
        drop: Sequence[str] = (),
    ) -> list[RankResultItem | AsapError | None]:
        self.sent.set()
        if self.gate is not None:
            await self.gate.wait()
        return [RankResultItem(1, -0.5, [], r.prompt_tokens) for r in requests]


def _core(**config: object) -> SchedulerCore:
    return SchedulerCore(SchedulerConfig(**config), 2, EchoClient())  # type: ignore[arg-type]


def test_async_mode_gets_the_async_dispatcher_with_its_policy() -> None:
    plain = make_dispatcher(_core(mode="async"))
    assert isinstance(plain, AsyncDispatcher) and isinstance(plain.policy, AsyncBatchPolicy)
    held = make_dispatcher(_core(mode="async", min_batch_tokens=64))
    assert isinstance(held, AsyncDispatcher) and isinstance(held.policy, MinBatchPolicy)
    assert not plain.holding


@pytest.mark.parametrize(("mode", "chunk"), [("sync", None), ("sync-chunked", 16)])
def test_sync_modes_get_the_step_dispatcher(mode: str, chunk: int | None) -> None:
    dispatcher = make_dispatcher(_core(mode=mode, chunk_tokens=16))
    assert isinstance(dispatcher, SyncDispatcher) and dispatcher.chunk_tokens == chunk
    assert not dispatcher.holding


async def test_the_core_prices_batches_with_the_cost_model_it_was_given() -> None:
    gate = asyncio.Event()
    client = EchoClient(gate)
    core = SchedulerCore(SchedulerConfig(), 1, client)
    fitted = AttentionCostModel(a_ms=1.0, b_ms=0.0, c_ms=5.0)
    core.set_cost_model(fitted)
    async with core:
        submitted = asyncio.create_task(core.submit(ScheduledRequest("r", [1, 2, 3])))
        async with asyncio.timeout(2.0):
            await client.sent.wait()
        (batch,) = core.ranks[0].batches.values()
        assert batch.predicted_ms == 8.0  # c + a·3
        gate.set()
        assert (await submitted).prompt_tokens == 3
        with pytest.raises(InternalError, match="before the scheduler core starts"):
            core.set_cost_model(AttentionCostModel())
    assert core.config.cost == fitted


def test_set_cost_model_does_not_write_the_callers_config() -> None:
    config = SchedulerConfig()
    core = SchedulerCore(config, 1, EchoClient())
    core.set_cost_model(AttentionCostModel(a_ms=1.0, b_ms=0.0, c_ms=5.0))
    assert config.cost == AttentionCostModel()
