"""The attention hot path on the fast plane (``attention_svc.direct_runner``: the compute thread posts and
takes each layer itself): it is what async batches use, gives the gRPC bytes plane's outputs for every
architecture, interleaves two micro-batches, holds senders back on full slots without losing anything,
and fails typed (nothing hangs) when an expert rank freezes, dies or a deadline passes, with the next
batches served again; abandoned slots are counted as quarantined."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

import pytest
import torch

from asap.commands.serve import attention_config
from asap.dataplane.fast import DEFAULT_PEER_TIMEOUT_S, FastPlane
from asap.dataplane.fast_attention import ATTACH_S
from asap.errors import Unavailable
from asap.syncstep import SyncStep
from attention_svc.core import AttentionExecutor
from attention_svc.direct_runner import DirectBatch
from tests.dataplane.test_fast_failures import _HANG_GUARD_S, _prompt, _with_expert_processes
from tests.dataplane.test_services_fast import ARCHS, cluster


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 40, 97)]


async def _run(executor: AttentionExecutor, name: str, prompts: list[list[int]]) -> list[object]:
    outcome = await asyncio.wait_for(
        executor.run_batch(
            [executor.make_prompt(f"{name}{i}", p, top_logprobs=2) for i, p in enumerate(prompts)]
        ),
        _HANG_GUARD_S,
    )
    return [(o.first.token_id, o.first.logprob, o.first.top_logprobs) for o in outcome.results]  # type: ignore[union-attr]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from asap.model.tiny import make_tiny

    name = str(request.param)
    return make_tiny(tmp_path_factory.mktemp(name) / "m", arch=name, layers=2, experts=8, top_k=2, seed=5)


async def test_hot_path_matches_grpc_bytes_alone_and_interleaved(arch: Path) -> None:
    prompts = _prompts()
    async with cluster(str(arch), "grpc") as attention:
        assert attention.executor is not None
        expected = await _run(attention.executor, "g", prompts)
        assert attention.executor.direct_batches == 0  # gRPC bytes keeps the event-loop path
    async with cluster(str(arch), "fast") as attention:
        executor = attention.executor
        assert executor is not None
        before = executor.direct_batches  # the warm-up batch
        alone = await _run(executor, "a", prompts)
        # two micro-batches at once on one compute thread (dual-batch), then a sync-mode step (loop path)
        first, second = await asyncio.gather(_run(executor, "b", prompts), _run(executor, "c", prompts[::-1]))
        sync = await executor.run_batch(
            [executor.make_prompt("s", prompts[0])], sync=SyncStep(step=1, participants=1)
        )
        assert executor.direct_batches == before + 3
        assert executor._runner.most_active == 2  # the two micro-batches were served together
    assert alone == expected and first == expected and second == expected[::-1]
    assert sync.results[0].first is not None


async def test_a_finished_batch_is_freed_without_the_garbage_collector(qwen3_dir: Path) -> None:
    """A hot-path batch must not be reachable from itself: a reference cycle keeps its tensors until a full
    collection, which a long-lived rank rarely runs (the soak's attention RSS grew with every prompt)."""
    async with cluster(str(qwen3_dir), "fast", experts=2) as attention:
        executor = attention.executor
        assert executor is not None
        await _run(executor, "w", _prompts())
        gc.collect()
        gc.disable()
        try:
            before = executor.direct_batches
            for i in range(3):
                await _run(executor, f"r{i}", _prompts())
            assert executor.direct_batches == before + 3
            # The compute thread may still be in the iteration that finished the last batch (its loop's
            # copy of the active list); a call queued behind it on that one thread runs once it is out.
            # A cycle would stay: the collector is off.
            await executor.on_compute_thread(int)
            left = [o for o in gc.get_objects() if type(o) is DirectBatch]
        finally:
            gc.enable()
    assert left == []


async def test_full_slots_hold_hot_path_senders_back_and_lose_nothing(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "fast", experts=1) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        plane = transport.links[0].plane
        assert isinstance(plane, FastPlane)
        prompts = [[p] for p in _prompts()]
        alone = [await _run(executor, f"a{i}", p) for i, p in enumerate(prompts)]
        plane.slots, plane.geometry = 1, None  # the next batch announces a region of one slot
        held = 0
        for _ in range(5):  # until the second micro-batch found the slot taken at least once
            together = await asyncio.gather(*(_run(executor, f"b{i}", p) for i, p in enumerate(prompts)))
            assert together == alone  # nothing lost or mixed up
            assert plane._end is not None and plane._end.geometry.slots == 1
            held = plane._end.held_back
            if held:
                break
        assert held > 0
        assert plane._end._free == [0]  # every credit came back


async def test_frozen_expert_on_the_hot_path_fails_within_the_bound(qwen3_dir: Path) -> None:
    async with _with_expert_processes(qwen3_dir, 1) as (attention, (proc,)):
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        expected = await _run(executor, "a", [_prompt()])
        plane = transport.links[0].plane
        assert isinstance(plane, FastPlane) and plane.peer_timeout_s == DEFAULT_PEER_TIMEOUT_S
        os.killpg(proc.proc.pid, signal.SIGSTOP)
        try:
            # a deadline first: the batch is cancelled, its dispatch abandoned (its slot quarantined)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(executor.run_batch([executor.make_prompt("d", _prompt())]), 0.5)
            # then the heartbeat bound: typed, nothing hangs
            with pytest.raises(Unavailable, match="stopped answering"):
                await _run(executor, "b", [_prompt()])
        finally:
            os.killpg(proc.proc.pid, signal.SIGCONT)
        assert plane.stats.quarantined >= 1
        assert await _run(executor, "c", [_prompt()]) == expected
        assert executor.direct_batches >= 3


async def test_killed_expert_on_the_hot_path_fails_typed_and_serving_resumes(qwen3_dir: Path) -> None:
    async with _with_expert_processes(qwen3_dir, 2) as (attention, procs):
        executor = attention.executor
        assert executor is not None
        await _run(executor, "a", [_prompt()])
        before = executor.direct_batches
        procs[1].kill()
        for name in ("b", "c"):  # the stream break fails the batch at once, and the next one too
            with pytest.raises(Unavailable):
                await _run(executor, name, [_prompt()])
        assert executor.direct_batches > before  # those went through the hot path
        # the compute thread's scheduler let go of it: other compute-thread work runs
        assert await asyncio.wait_for(executor.on_compute_thread(lambda: 7), _HANG_GUARD_S) == 7


def test_fast_bounds_are_config_fields_with_flags() -> None:
    from asap.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "attention", "--experts", "h:1"])
    config = attention_config(args)
    assert (config.fast_peer_timeout_s, config.fast_attach_timeout_s) == (DEFAULT_PEER_TIMEOUT_S, ATTACH_S)
    args = parser.parse_args(
        ["serve", "attention", "--experts", "h:1", "--fast-peer-timeout", "2.5", "--fast-attach-timeout", "9"]
    )
    config = attention_config(args)
    assert (config.fast_peer_timeout_s, config.fast_attach_timeout_s) == (2.5, 9.0)
