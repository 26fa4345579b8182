"""What the long-running cluster benchmarks (faults.py, soak.py) share: their prompts, the warm-up of a
fresh cluster, and its capacity measured closed-loop (the open-loop load they then send is a fraction of
it, ``asap.bench.faultload.open_loop``)."""

from __future__ import annotations

import asyncio
import random
import time

from asap.bench.faultload import OK, Call, one_call
from asap.client import AsapClient


def prompt(rng: random.Random) -> list[int]:
    """A prompt of 16 to 96 random token ids (the tiny model's vocabulary)."""
    return [rng.randrange(256) for _ in range(rng.randint(16, 96))]


async def warm_up(client: AsapClient) -> None:
    """16 calls of growing length at once, so that no first-call cost lands in the capacity."""
    await asyncio.gather(*(client.prefill(tokens=[i + 1] * (8 + i)) for i in range(16)))


async def capacity(client: AsapClient, seconds: float, concurrency: int = 4) -> float:
    """Completed calls per second of a closed loop of ``concurrency`` callers."""
    rng = random.Random(1)
    end = time.monotonic() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < end:
            call = Call(start=time.monotonic())
            await one_call(client, prompt(rng), 30.0, call)
            done += call.status == OK

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.monotonic() - started)
