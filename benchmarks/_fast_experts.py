"""Expert ranks in processes of their own on the fast plane, the attention service in this process: the
set-up the per-layer benchmarks share (``layer_hops.py``, ``layer_profile.py``, ``hot_path_ab.py``), so
each says only what it measures."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from attention_svc.config import AttentionServiceConfig
from attention_svc.core import AttentionExecutor
from attention_svc.server import AttentionService
from tests.procs import ServiceProcess

MODEL = str(Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b-16l")
"""The 16-layer Qwen3-30B-A3B shape of issue 14's CPU target."""


@contextlib.asynccontextmanager
async def fast_experts(
    experts: int, compute: str, *, entry: Sequence[str] = ("-m", "expert_svc"), model: str = MODEL
) -> AsyncIterator[tuple[AttentionExecutor, list[ServiceProcess]]]:
    """``experts`` expert ranks started as ``python <entry> ...`` on the fast plane, then an attention
    service here linked to them; yields its executor and the expert processes, and stops all of them."""
    common = ["--model", model, "--port", "0", "--compute", compute, "--dtype", "bfloat16"]
    procs = [
        ServiceProcess(
            f"expert-{r}",
            [*entry, *common, "--rank", str(r), "--num-ranks", str(experts), "--data-plane", "fast"],
        )
        for r in range(experts)
    ]
    try:
        targets = [p.wait_ready() for p in procs]
        config = AttentionServiceConfig(
            model=model, expert_targets=targets, data_plane="fast", compute=compute, dtype="bfloat16"
        )
        attention = AttentionService(config)
        await attention.start()
        try:
            executor = attention.executor
            assert executor is not None
            yield executor, procs
        finally:
            await attention.stop(grace_s=0)
    finally:
        for p in procs:
            p.stop()
