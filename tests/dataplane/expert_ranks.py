"""What the data-plane failure tests share: expert ranks in their own processes with an attention
service over a chosen plane, a prompt, and a dispatch routed to one expert (used by the fast plane's
``test_fast_failures`` and the NIXL plane's ``test_services_nixl``)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from asap.model.placement import RankDispatch
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from tests.procs import ServiceProcess

__all__ = ["HANG_GUARD_S", "dispatch", "expert_processes", "prompt"]

HANG_GUARD_S = 60
"""Generous: only there so a regression fails instead of hanging the suite."""


@contextlib.asynccontextmanager
async def expert_processes(
    model: Path, ranks: int, plane: str = "fast", *, expert_plane: str | None = None
) -> AsyncIterator[tuple[AttentionService, list[ServiceProcess]]]:
    """``ranks`` expert processes (``--data-plane expert_plane`` when given, else their default) and an
    attention service in this process on ``plane``; stopped processes are resumed before they stop."""
    argv = ["-m", "expert_svc", "--model", str(model), "--port", "0", "--num-ranks", str(ranks)]
    argv += ["--data-plane", expert_plane] if expert_plane else []
    procs = [ServiceProcess(f"expert-{r}", [*argv, "--rank", str(r)]) for r in range(ranks)]
    attention = None
    try:
        targets = [p.wait_ready() for p in procs]
        attention = AttentionService(
            AttentionServiceConfig(model=str(model), expert_targets=targets, data_plane=plane)
        )
        await attention.start()
        yield attention, procs
    finally:
        if attention is not None:
            await attention.stop(grace_s=0)
        for p in procs:
            with contextlib.suppress(Exception):
                os.killpg(p.proc.pid, signal.SIGCONT)
            p.stop()


def prompt(n: int = 40) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def dispatch(rank: int, rows: int, hidden: int, top_k: int, expert: int) -> RankDispatch:
    """``rows`` random rows of ``rank`` whose only expert is ``expert`` (weight 1)."""
    ids = torch.full((rows, top_k), -1, dtype=torch.int32)
    ids[:, 0] = expert
    weights = torch.zeros(rows, top_k)
    weights[:, 0] = 1.0
    return RankDispatch(
        rank=rank,
        rows=torch.arange(rows),
        hidden=torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows)),
        expert_ids=ids,
        weights=weights,
    )
