"""In-process cluster (expert + attention services on port 0): the fast plane (descriptor rings and slots)
is really used, gives outputs identical to the gRPC bytes plane for every architecture, is what ``auto``
picks, leaves no shared memory behind, and falls back (or fails clearly when forced) where the expert
rank refuses it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from asap.dataplane.fast import FastPlane
from asap.errors import InvalidArgument
from asap.model.tiny import make_tiny
from asap.optimizations import OPTIMIZATIONS
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from expert_svc.config import ExpertServiceConfig
from expert_svc.server import ExpertService

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")


def _leftovers() -> set[str]:
    """Shared-memory regions and doorbells of fast links that still have a name."""
    shm = {n for n in os.listdir("/dev/shm") if n.startswith("asap_")}
    bells = {
        n for n in os.listdir(tempfile.gettempdir()) if n.startswith("asap_") and n[-4:] in (".req", ".cmp")
    }
    return shm | bells


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = str(request.param)
    return make_tiny(tmp_path_factory.mktemp(arch) / "m", arch=arch, layers=2, experts=8, top_k=2, seed=4)


@contextlib.asynccontextmanager
async def cluster(
    model: str, plane: str, *, expert_plane: str = "auto", experts: int = 2, compute: str = "torch"
) -> AsyncIterator[AttentionService]:
    """``experts`` expert ranks and an attention rank on ``plane``, in process, on port 0."""
    ranks = [
        ExpertService(
            ExpertServiceConfig(
                model=model,
                rank=r,
                num_ranks=experts,
                optimizations=frozenset(OPTIMIZATIONS),
                data_plane=expert_plane,
                compute=compute,
            )
        )
        for r in range(experts)
    ]
    attention = None
    try:
        targets = [await e.start() for e in ranks]
        attention = AttentionService(
            AttentionServiceConfig(model=model, expert_targets=targets, data_plane=plane, compute=compute)
        )
        await attention.start()
        yield attention
    finally:
        if attention is not None:
            await attention.stop(grace_s=0)
        for e in ranks:
            await e.stop(grace_s=0)


async def _firsts(model: str, plane: str, prompts: list[list[int]]) -> tuple[list[object], list[int]]:
    async with cluster(model, plane) as attention:
        assert attention.executor is not None and attention.transport is not None
        outcome = await attention.executor.run_batch(
            [attention.executor.make_prompt(f"p{i}", p, top_logprobs=3) for i, p in enumerate(prompts)]
        )
        links = attention.transport.links
        fast = [link.plane.fast_exchanges if isinstance(link.plane, FastPlane) else 0 for link in links]
        firsts = [(o.first.token_id, o.first.logprob, o.first.top_logprobs) for o in outcome.results]  # type: ignore[union-attr]
        return firsts, fast


async def test_fast_plane_outputs_match_grpc_bytes(arch_dir: Path) -> None:
    before = _leftovers()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 60, 130)]
    via_grpc, none = await _firsts(str(arch_dir), "grpc", prompts)
    via_fast, fast = await _firsts(str(arch_dir), "fast", prompts)
    assert via_fast == via_grpc  # identical first tokens and logprobs
    assert none == [0, 0] and all(n > 0 for n in fast)  # every dispatch of fast went through the rings
    assert _leftovers() == before


async def test_auto_picks_fast_and_falls_back_where_refused(qwen3_dir: Path) -> None:
    async with cluster(str(qwen3_dir), "auto") as attention:
        assert attention.transport is not None
        assert [link.data_plane for link in attention.transport.links] == ["fast", "fast"]
    async with cluster(str(qwen3_dir), "auto", expert_plane="shm") as attention:
        assert attention.transport is not None
        assert [link.data_plane for link in attention.transport.links] == ["shm", "shm"]
    with pytest.raises(InvalidArgument, match="does not accept fast links"):
        async with cluster(str(qwen3_dir), "fast", expert_plane="grpc"):
            pass


async def test_emulated_compute_uses_fast_plane(qwen3_dir: Path) -> None:
    compute = "emulated:h200"
    async with cluster(str(qwen3_dir), "auto", compute=compute) as attention:
        executor, transport = attention.executor, attention.transport
        assert executor is not None and transport is not None
        assert [link.data_plane for link in transport.links] == ["fast", "fast"]
        outcome = await executor.run_batch([executor.make_prompt("e", list(range(1, 129)))])
        assert outcome.results[0].error is None and outcome.results[0].first is not None
        assert sum(link.plane.fast_exchanges for link in transport.links) > 0  # type: ignore[attr-defined]
