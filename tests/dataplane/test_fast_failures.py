"""The fast plane when things go wrong: a killed or frozen expert rank fails the waiting batches with
``Unavailable`` (nothing hangs) and the rest keeps serving; malformed descriptors fail their dispatch
with ``InvalidArgument`` and the rank goes on; a full set of slots holds senders back, losing nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import torch

from asap.dataplane.fast import FastPlane
from asap.dataplane.fastlink import SlotHeader
from asap.errors import InvalidArgument, Unavailable
from tests.dataplane.expert_ranks import HANG_GUARD_S as _HANG_GUARD_S
from tests.dataplane.expert_ranks import dispatch as _dispatch
from tests.dataplane.expert_ranks import expert_processes as _with_expert_processes
from tests.dataplane.expert_ranks import prompt as _prompt
from tests.dataplane.test_services_fast import cluster


async def test_frozen_expert_fails_typed_and_serving_resumes(qwen3_dir: Path) -> None:
    async with _with_expert_processes(qwen3_dir, 1) as (attention, (proc,)):
        executor = attention.executor
        assert executor is not None
        expected = (await executor.run_batch([executor.make_prompt("a", _prompt())])).results[0].first
        os.killpg(
            proc.proc.pid, signal.SIGSTOP
        )  # alive, stream open, but never answers: only the heartbeat tells
        try:
            with pytest.raises(Unavailable, match="stopped answering"):
                await asyncio.wait_for(
                    executor.run_batch([executor.make_prompt("b", _prompt())]), _HANG_GUARD_S
                )
        finally:
            os.killpg(proc.proc.pid, signal.SIGCONT)
        again = await asyncio.wait_for(
            executor.run_batch([executor.make_prompt("c", _prompt())]), _HANG_GUARD_S
        )
        assert again.results[0].first == expected  # a fresh region was announced and served


async def test_killed_expert_fails_typed_and_the_other_rank_keeps_serving(qwen3_dir: Path) -> None:
    async with _with_expert_processes(qwen3_dir, 2) as (attention, procs):
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        await executor.run_batch([executor.make_prompt("a", _prompt())])
        procs[1].kill()
        for name in ("b", "c"):  # the stream break fails the batch at once, and the next one too
            with pytest.raises(Unavailable):
                await asyncio.wait_for(
                    executor.run_batch([executor.make_prompt(name, _prompt())]), _HANG_GUARD_S
                )
        live = transport.links[0]
        cfg = executor.part.config
        d = _dispatch(0, 16, cfg.hidden_size, cfg.top_k, expert=0)  # expert 0 lives on rank 0
        result = await asyncio.wait_for(live.exchange(10_000, cfg.moe_layer_ids[0], d), _HANG_GUARD_S)
        assert result.hidden.shape == (16, cfg.hidden_size) and bool(result.hidden.abs().sum() > 0)


async def test_malformed_descriptors_fail_their_dispatch_only(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "fast", experts=1) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        expected = (await executor.run_batch([executor.make_prompt("a", _prompt())])).results[0].first
        plane = transport.links[0].plane
        assert isinstance(plane, FastPlane) and plane._end is not None
        end = plane._end
        cfg = executor.part.config
        layer = cfg.moe_layer_ids[0]
        d = _dispatch(0, 4, cfg.hidden_size, cfg.top_k, expert=0)

        async def publish(
            header: SlotHeader, *, rows: int = 4, layer: int = layer, ids: torch.Tensor | None = None
        ) -> None:
            slot = await end.take_slot()
            end.fill(slot, header, d.hidden, d.expert_ids if ids is None else ids, d.weights)
            _, future = end.publish(slot, 77, layer, rows, shape_only=False, link_s=0)
            await asyncio.wait_for(future, _HANG_GUARD_S)

        with pytest.raises(
            InvalidArgument, match="does not match its descriptor"
        ):  # header of another dispatch
            await publish(SlotHeader(77, 999, layer, 4, 0))
        with pytest.raises(InvalidArgument, match="does not fit"):  # more rows than a slot holds
            await publish(end.header(77, layer, 4, "", ""), rows=10**7)
        with pytest.raises(InvalidArgument, match="not an MoE layer"):
            await publish(end.header(77, 999, 4, "", ""), layer=999)
        with pytest.raises(InvalidArgument, match="expert ids"):
            await publish(
                end.header(77, layer, 4, "", ""), ids=torch.full((4, cfg.top_k), 10**6, dtype=torch.int32)
            )
        again = (await executor.run_batch([executor.make_prompt("b", _prompt())])).results[0].first
        assert again == expected and end.broken is None  # the same link goes on serving


async def test_full_slots_hold_senders_back_and_lose_nothing(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "fast", experts=1) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        link = transport.links[0]
        plane = link.plane
        assert isinstance(plane, FastPlane)
        plane.slots, plane.geometry = 2, None  # the next dispatch announces a region of two slots
        cfg = executor.part.config
        layer = cfg.moe_layer_ids[0]
        dispatches = [
            _dispatch(0, 8 + i, cfg.hidden_size, cfg.top_k, expert=i % cfg.num_experts) for i in range(12)
        ]
        alone = [(await link.exchange(100 + i, layer, d)).hidden for i, d in enumerate(dispatches)]
        assert plane._end is not None and plane._end.geometry.slots == 2
        waited = 0
        calls = [asyncio.ensure_future(link.exchange(200 + i, layer, d)) for i, d in enumerate(dispatches)]
        while not all(c.done() for c in calls):
            waited = max(waited, len(plane._end._waiters))
            await asyncio.sleep(0)
        together = [c.result().hidden for c in calls]
        assert waited > 0  # senders were held back by the credits
        assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))  # nothing lost or mixed
        assert sorted(plane._end._free) == [0, 1]
