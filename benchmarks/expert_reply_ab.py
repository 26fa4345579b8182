"""An expert rank's async chunks answered on a real asyncio loop with real compute and codec threads
(emulated part, charges not slept): the session's callback reply (``expert_svc.reply.Reply``)
against its task reply (``_reply``), alternating in one process; process CPU per chunk, to stdout.
    python benchmarks/expert_reply_ab.py MODEL_DIR [ROUNDS] [CHUNKS]
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from asap.emulation import load_profile
from asap.emulation.parts import EmulatedExpertPart
from asap.model.config import ModelConfig, load_config
from asap.sim.devices import ChargeSleeper
from asap.wire.chunks import dispatch_chunks
from expert_svc import exchange
from expert_svc.core import ExpertExecutor

WIDTH = 16
"""Chunks in flight at once (a layer's dispatches from 16 attention ranks)."""
ROWS = 64


async def _run(cfg: ModelConfig, by_task: bool, chunks: int) -> float:
    never_waits = exchange.never_waits
    if by_task:
        exchange.never_waits = lambda _outbound: False  # type: ignore[assignment]
    part = EmulatedExpertPart(cfg, range(cfg.num_experts), load_profile("h200"), sleeper=ChargeSleeper())
    executor = ExpertExecutor(part)
    await executor.start()
    codec = ThreadPoolExecutor(1)
    session = exchange.ExpertExchange(executor, codec).session()
    outbound: exchange.Outbound = asyncio.Queue()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(cfg.num_experts, (ROWS, cfg.top_k), generator=g).to(torch.int32)
    hidden = torch.zeros(ROWS, cfg.hidden_size, dtype=torch.bfloat16)
    layer = cfg.moe_layer_ids[0]
    msgs = [
        dispatch_chunks(
            micro_batch=i,
            layer=layer,
            attention_rank=0,
            hidden=hidden,
            expert_ids=ids,
            weights=torch.rand(ROWS, cfg.top_k, generator=g),
        )[0]
        for i in range(WIDTH)
    ]
    try:
        start = time.process_time()
        for _ in range(chunks // WIDTH):
            for msg in msgs:
                await session.accept(msg, outbound)
            for _ in msgs:
                await outbound.get()
        return (time.process_time() - start) / chunks * 1e6
    finally:
        exchange.never_waits = never_waits  # type: ignore[assignment]
        await executor.stop()
        codec.shutdown()


async def _main(cfg: ModelConfig, rounds: int, chunks: int) -> None:
    for round_ in range(rounds):
        for by_task in (True, False):
            us = await _run(cfg, by_task, chunks)
            print(
                f"round {round_} {'task     ' if by_task else 'callbacks'} {us:7.1f} us CPU per chunk",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(
        _main(
            load_config(Path(sys.argv[1])),
            int(sys.argv[2]) if len(sys.argv) > 2 else 8,
            int(sys.argv[3]) if len(sys.argv) > 3 else 8000,
        )
    )
