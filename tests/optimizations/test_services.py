"""Every optimization combination gives the reference outputs on real compute; expert-overlap's stages
really overlap (and really do not when it is off). Services run in-process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from asap.client import AsapClient
from asap.model.reference import load_model
from asap.model.sampling import first_token
from asap.optimizations import OPTIMIZATIONS, parse_optimizations
from asap.v1 import expert_pb2, expert_pb2_grpc
from asap.wire.chunks import dispatch_chunks
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.costmodel import AttentionCostModel
from scheduler_svc.server import SchedulerService, SchedulerServiceConfig

COMBINATIONS = ["all", "none", *(",".join(o for o in OPTIMIZATIONS if o != off) for off in OPTIMIZATIONS)]


async def _cluster(model: str, optimizations: frozenset[str]) -> tuple[str, list[object]]:
    experts = [
        ExpertService(ExpertServiceConfig(model=model, rank=r, num_ranks=2, optimizations=optimizations))
        for r in range(2)
    ]
    targets = [await e.start() for e in experts]
    inflight = 2 if "dual-batch" in optimizations else 1
    attention = [
        AttentionService(
            AttentionServiceConfig(model=model, rank=r, expert_targets=targets, max_inflight_batches=inflight)
        )
        for r in range(2)
    ]
    ranks = [await a.start() for a in attention]
    core = SchedulerConfig(
        max_inflight_per_rank=inflight,
        min_batch_tokens=64 if "min-batch" in optimizations else 0,
        max_wait_ms=20.0,
        cost=AttentionCostModel(),
    )
    scheduler = SchedulerService(
        SchedulerServiceConfig(model=model, attention_targets=ranks, port=0, core=core, calibrate=False)
    )
    return await scheduler.start(), [scheduler, *attention, *experts]


@pytest.mark.parametrize("combination", COMBINATIONS)
async def test_every_combination_matches_the_reference(qwen3_dir: Path, combination: str) -> None:
    address, services = await _cluster(str(qwen3_dir), parse_optimizations(combination))
    try:
        g = torch.Generator().manual_seed(7)
        prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in (1, 5, 40, 90, 17, 3)]
        async with AsapClient(address, retries=0) as client:
            results = await asyncio.gather(*(client.prefill(tokens=p, top_logprobs=3) for p in prompts))
        attention, experts = load_model(qwen3_dir)
        for prompt, result in zip(prompts, results, strict=True):
            expected = first_token(attention.forward([torch.tensor(prompt)], experts)[0], top_logprobs=3)
            assert result.first_token_id == expected.token_id
            assert abs(result.first_token_logprob - expected.logprob) <= 1e-4
    finally:
        for service in services:
            await service.stop(grace_s=0)  # type: ignore[attr-defined]


@pytest.mark.parametrize("overlap", [True, False])
async def test_expert_overlap_receives_while_computing_only_when_on(qwen3_dir: Path, overlap: bool) -> None:
    enabled = frozenset(OPTIMIZATIONS) if overlap else frozenset(OPTIMIZATIONS) - {"expert-overlap"}
    service = ExpertService(ExpertServiceConfig(model=str(qwen3_dir), optimizations=enabled))
    address = await service.start()
    assert service.executor is not None
    executor = service.executor
    gate, entered = threading.Event(), threading.Event()
    real_compute = executor.part.compute

    def gated(*args: object) -> torch.Tensor:
        entered.set()
        gate.wait(10)
        return real_compute(*args)  # type: ignore[arg-type]

    executor.part.compute = gated  # type: ignore[method-assign]
    second_submitted = asyncio.Event()
    real_submit = executor.submit

    submits = 0

    async def counting_submit(*args: Any, **kwargs: Any) -> Any:
        nonlocal submits
        future = await real_submit(*args, **kwargs)
        submits += 1
        if submits == 2:
            second_submitted.set()
        return future

    executor.submit = counting_submit  # type: ignore[method-assign]
    chunks = [
        dispatch_chunks(
            micro_batch=mb, layer=1, attention_rank=0, hidden=torch.randn(4, 64),
            expert_ids=torch.tensor([[0, 1]] * 4, dtype=torch.int32), weights=torch.rand(4, 2),
        )[0]
        for mb in (1, 2)
    ]  # fmt: skip

    async def requests() -> AsyncIterator[expert_pb2.DispatchChunk]:
        for chunk in chunks:
            yield chunk

    try:
        async with grpc.aio.insecure_channel(address) as channel:
            call = expert_pb2_grpc.ExpertStub(channel).Exchange(requests())
            await asyncio.to_thread(entered.wait, 10)  # chunk 1 is being computed
            # With overlap, chunk 2 is received and queued meanwhile; without, the stream is not read, so
            # its absence can only be shown by a bounded wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(second_submitted.wait(), 5.0 if overlap else 0.3)
            received_while_computing = executor._queue.qsize()
            gate.set()
            replies = [msg async for msg in call]
        assert sorted(r.micro_batch for r in replies) == [1, 2]
        assert received_while_computing == (1 if overlap else 0)
    finally:
        gate.set()
        await service.stop(grace_s=0)
