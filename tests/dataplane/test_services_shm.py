"""In-process cluster (expert + attention services on port 0): the shm data plane is really used and
gives outputs identical to the gRPC bytes plane; forcing shm where it cannot work fails clearly."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import torch

from asap.errors import InvalidArgument
from asap.optimizations import OPTIMIZATIONS
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService
from tests.waiting import until


def _segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("asap_")}


@contextlib.asynccontextmanager
async def _cluster(model: str, plane: str) -> AsyncIterator[AttentionService]:
    """Two expert ranks (shm) and an attention rank on ``plane``, in process, on port 0."""
    experts = [
        ExpertService(
            # expert ranks that accept shm but not fast links, so auto settles on shm (auto prefers fast)
            ExpertServiceConfig(
                model=model, rank=r, num_ranks=2, optimizations=frozenset(OPTIMIZATIONS), data_plane="shm"
            )
        )
        for r in range(2)
    ]
    attention = None
    try:
        targets = [await e.start() for e in experts]
        attention = AttentionService(
            AttentionServiceConfig(model=model, expert_targets=targets, data_plane=plane)
        )
        await attention.start()
        assert attention.executor is not None and attention.transport is not None
        yield attention
    finally:
        if attention is not None:
            await attention.stop(grace_s=0)
        for e in experts:
            await e.stop(grace_s=0)


async def _run(
    model: str, plane: str, prompts: list[list[int]]
) -> tuple[list[object], list[tuple[int, int]]]:
    async with _cluster(model, plane) as attention:
        assert attention.executor is not None and attention.transport is not None
        outcomes = await attention.executor.run_batch(
            [attention.executor.make_prompt(f"p{i}", p, top_logprobs=3) for i, p in enumerate(prompts)]
        )
        links = attention.transport.links
        counters = [(link.region_hidden_bytes, link.inline_hidden_bytes) for link in links]
        # results come back the way the rows went: written over them in the region, or inline
        assert all((link.result_ref_bytes > 0) == (link.data_plane == "shm") for link in links)
        assert all(link.result_ref_bytes <= link.region_hidden_bytes for link in links)
        assert {link.data_plane for link in links} == {"shm" if plane == "auto" else plane}
        return [(o.first.token_id, o.first.logprob, o.first.top_logprobs) for o in outcomes.results], counters  # type: ignore[union-attr]


async def test_shm_plane_is_used_and_outputs_match_grpc(qwen3_dir: Path) -> None:
    before = _segments()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 60, 130)]
    via_grpc, grpc_counters = await _run(str(qwen3_dir), "grpc", prompts)
    via_shm, shm_counters = await _run(str(qwen3_dir), "shm", prompts)
    assert via_shm == via_grpc
    assert all(shm == 0 and inline > 0 for shm, inline in grpc_counters)
    assert all(shm > 0 and inline == 0 for shm, inline in shm_counters)
    auto, auto_counters = await _run(str(qwen3_dir), "auto", prompts[:1])
    assert auto == via_grpc[:1] and all(shm > 0 for shm, _ in auto_counters)
    assert _segments() == before  # every region was unlinked


async def test_forced_shm_fails_clearly_when_the_expert_rank_refuses(qwen3_dir: Path) -> None:
    expert = ExpertService(ExpertServiceConfig(model=str(qwen3_dir), data_plane="grpc"))
    try:
        target = await expert.start()
        attention = AttentionService(
            AttentionServiceConfig(model=str(qwen3_dir), expert_targets=[target], data_plane="shm")
        )
        with pytest.raises(InvalidArgument, match="does not accept shared memory"):
            await attention.start()
        await attention.stop(grace_s=0)
        # auto falls back to grpc bytes
        attention = AttentionService(AttentionServiceConfig(model=str(qwen3_dir), expert_targets=[target]))
        await attention.start()
        assert attention.transport is not None
        assert [link.data_plane for link in attention.transport.links] == ["grpc"]
        await attention.stop(grace_s=0)
    finally:
        await expert.stop(grace_s=0)


def test_forced_shm_to_a_remote_host_fails_at_construction() -> None:
    from attention_svc.transport import GrpcExpertTransport

    with pytest.raises(InvalidArgument, match="not on this host"):
        GrpcExpertTransport(
            ["10.9.8.7:5000"], attention_rank=0, hidden_size=8, dtype=torch.float32, max_chunk_bytes=4096,
            data_plane="shm",
        )  # fmt: skip


def _signal_after(obj: object, method: str, done: Callable[[], bool]) -> asyncio.Event:
    """An event set once ``done()`` holds after a call of ``obj.method`` (wrapped on the instance)."""
    event = asyncio.Event()
    original = getattr(obj, method)

    def wrapped(*args: object) -> object:
        result = original(*args)
        if done():
            event.set()
        return result

    setattr(obj, method, wrapped)
    return event


async def test_cancelled_dispatch_keeps_its_slots_until_answered(qwen3_dir: Path) -> None:
    """A batch cancelled mid-layer leaves its slots quarantined until the expert rank has answered (it may
    still write results there); then every slot is free again and later batches are unaffected."""
    async with _cluster(str(qwen3_dir), "shm") as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        g = torch.Generator().manual_seed(5)
        prompt = torch.randint(0, 256, (300,), generator=g).tolist()
        expected = (await executor.run_batch([executor.make_prompt("ref", prompt)])).results[0].first
        regions = [link.plane.regions for link in transport.links]  # type: ignore[attr-defined]
        assert all(r is not None for r in regions)
        freed = [
            _signal_after(r, "late_answer", lambda r=r: r.in_quarantine == 0)
            for r in regions
            if r is not None
        ]
        for attempt in range(10):  # cancel right after chunks went out, before they are answered
            outbox = transport.links[0].stream.open().outbox  # the stream of the reference batch
            sent = _signal_after(outbox, "put", lambda: True)
            task = asyncio.create_task(executor.run_batch([executor.make_prompt(f"x{attempt}", prompt)]))
            await asyncio.wait_for(sent.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            if sum(link.quarantined for link in transport.links):
                break
        assert sum(link.quarantined for link in transport.links) >= 1
        for r, event in zip((r for r in regions if r is not None), freed, strict=True):
            if r.in_quarantine:  # the late answers arrive and free the slots
                await asyncio.wait_for(event.wait(), 30)
        # A region whose dispatch was still in flight when the others' answers freed theirs frees its
        # slots when its own answer lands: wait for that, not for a fixed time.
        assert await until(
            lambda: all(r is not None and r.in_quarantine == 0 and r.bytes_in_use == 0 for r in regions),
            timeout_s=30,
        ), [(r.in_quarantine, r.bytes_in_use) for r in regions if r is not None]
        again = (await executor.run_batch([executor.make_prompt("again", prompt)])).results[0].first
        assert again == expected
