"""ExpertExecutor: merging, backpressure, validation, lifecycle (no grpc)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from asap.errors import InvalidArgument, Unavailable
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from expert_svc.core import ExpertExecutor


def _part(model_dir: Path, expert_ids: list[int]) -> ExpertPart:
    config = load_config(model_dir)
    with CheckpointReader(model_dir) as reader:
        return ExpertPart.from_source(reader, config, expert_ids)


class GatedPart:
    """Wraps a real part; compute blocks until released, and records each call's row count."""

    def __init__(self, part: ExpertPart) -> None:
        self.part = part
        self.config = part.config
        self.hosted = part.hosted
        self.dtype = part.dtype
        self.device = part.device
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple[int, int]] = []

    def compute(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        self.entered.set()
        self.release.wait(10)
        self.calls.append((layer, hidden.shape[0]))
        return self.part.compute(layer, hidden, ids, weights)


def _chunk(part: ExpertPart, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = part.config.top_k
    hidden = torch.randn(rows, part.config.hidden_size, generator=g)
    hosted = torch.tensor(part.hosted)
    ids = hosted[torch.randint(len(hosted), (rows, k), generator=g)].to(torch.int32)
    weights = torch.rand(rows, k, generator=g)
    return hidden, ids, weights


async def test_results_equal_direct_compute(qwen3_dir: Path) -> None:
    part = _part(qwen3_dir, [0, 1, 2, 3])
    executor = ExpertExecutor(part)
    await executor.start()
    try:
        chunks = [_chunk(part, rows, seed) for seed, rows in enumerate((1, 5, 17))]
        futures = [await executor.submit(1, *c) for c in chunks]
        for chunk, future in zip(chunks, futures, strict=True):
            result = await future
            torch.testing.assert_close(result.hidden, part.compute(1, *chunk), rtol=0, atol=1e-6)
            assert result.compute_ns > 0
    finally:
        await executor.stop()


async def test_waiting_chunks_of_one_layer_are_computed_together(qwen3_dir: Path) -> None:
    gated = GatedPart(_part(qwen3_dir, [0, 1, 2, 3]))
    executor = ExpertExecutor(gated)  # type: ignore[arg-type]
    await executor.start()
    try:
        blocker = await executor.submit(0, *_chunk(gated.part, 2, 0))
        await asyncio.to_thread(gated.entered.wait, 10)
        # While the compute thread is busy, three chunks of layer 1 and one of layer 2 queue up.
        queued = [
            await executor.submit(layer, *_chunk(gated.part, 3, s)) for s, layer in enumerate((1, 2, 1, 1))
        ]
        gated.release.set()
        await asyncio.gather(blocker, *queued)
        assert gated.calls == [(0, 2), (1, 9), (2, 3)]
        assert executor.stats.chunks == 5 and executor.stats.calls == 3
    finally:
        gated.release.set()
        await executor.stop()


async def test_full_queue_backpressures_and_drops_nothing(qwen3_dir: Path) -> None:
    gated = GatedPart(_part(qwen3_dir, [0, 1, 2, 3]))
    executor = ExpertExecutor(gated, queue_depth=2)  # type: ignore[arg-type]
    await executor.start()
    try:
        first = await executor.submit(0, *_chunk(gated.part, 1, 0))
        await asyncio.to_thread(gated.entered.wait, 10)
        futures = [await executor.submit(1, *_chunk(gated.part, 1, s)) for s in (1, 2)]
        blocked = asyncio.create_task(executor.submit(1, *_chunk(gated.part, 1, 3)))
        await asyncio.sleep(0.05)
        assert not blocked.done(), "a full queue must make submit() wait"
        gated.release.set()
        futures.append(await asyncio.wait_for(blocked, 10))
        results = await asyncio.gather(first, *futures)
        assert len(results) == 4 and all(r.hidden.shape == (1, gated.config.hidden_size) for r in results)
    finally:
        gated.release.set()
        await executor.stop()


async def test_rejects_unhosted_experts_and_dense_or_unknown_layers(qwen3_dir: Path) -> None:
    part = _part(qwen3_dir, [0, 1])
    executor = ExpertExecutor(part)
    await executor.start()
    try:
        hidden, ids, weights = _chunk(part, 2, 0)
        with pytest.raises(InvalidArgument, match="not hosted"):
            await executor.submit(0, hidden, torch.full_like(ids, 5), weights)
        with pytest.raises(InvalidArgument, match="not an MoE layer"):
            await executor.submit(99, hidden, ids, weights)
        with pytest.raises(InvalidArgument, match=r"\[-1, 8\)"):
            await executor.submit(0, hidden, torch.full_like(ids, 8), weights)
        masked = ids.clone()
        masked[:, 1] = -1
        result = await (await executor.submit(0, hidden, masked, weights))
        assert torch.isfinite(result.hidden).all()
    finally:
        await executor.stop()


async def test_stop_fails_queued_work_with_unavailable(qwen3_dir: Path) -> None:
    gated = GatedPart(_part(qwen3_dir, [0, 1, 2, 3]))
    executor = ExpertExecutor(gated)  # type: ignore[arg-type]
    await executor.start()
    running = await executor.submit(0, *_chunk(gated.part, 1, 0))
    await asyncio.to_thread(gated.entered.wait, 10)
    queued = await executor.submit(1, *_chunk(gated.part, 1, 1))
    stopper = asyncio.create_task(executor.stop())
    await asyncio.sleep(0)
    gated.release.set()
    await stopper
    with pytest.raises(Unavailable):
        await queued
    assert running.done()
    with pytest.raises(Unavailable):
        await executor.submit(0, *_chunk(gated.part, 1, 2))


def test_merged_shape_only_rows_are_what_cat_makes() -> None:
    """A merge of meta rows (emulated compute) is a meta tensor of cat's shape and dtype; anything else
    is cat itself."""
    from expert_svc.core import _merged_rows

    meta = [torch.empty((n, 6), dtype=torch.bfloat16, device="meta") for n in (3, 0, 5)]
    merged = _merged_rows(meta, torch.device("meta"))
    want = torch.cat(meta)
    assert merged.device == want.device and merged.shape == want.shape and merged.dtype == want.dtype
    real = [torch.arange(6.0).reshape(3, 2), torch.ones(1, 2)]
    assert torch.equal(_merged_rows(real, torch.device("cpu")), torch.cat(real))
