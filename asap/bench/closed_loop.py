"""Closed-loop load for the overhead benchmarks (``benchmarks/metrics_overhead.py``,
``benchmarks/tracing_throughput.py``): ``concurrency`` workers each send their next prefill as soon as
the last one answered, until ``requests`` were sent. Throughput A/B runs want this (the offered load
follows the server); TTFT benchmarks want the open loop of ``asap.bench.runner`` instead.
"""

from __future__ import annotations

import asyncio
import time

from asap.bench.runner import PrefillClient
from asap.client import AsapClient

__all__ = ["closed_loop", "run_closed_loop"]


async def run_closed_loop(
    client: PrefillClient, requests: int, concurrency: int, tokens: int, *, warmup: int
) -> tuple[float, list[float]]:
    """(seconds, client TTFTs in ms) of ``requests`` prefill calls of ``tokens`` tokens each from
    ``concurrency`` workers, after ``warmup`` calls that are not measured."""
    prompt = [(7 * j) % 200 + 1 for j in range(tokens)]
    for _ in range(warmup):
        await client.prefill(tokens=prompt)
    remaining = requests
    ttfts: list[float] = []

    async def worker(w: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            result = await client.prefill(tokens=[(t + w) % 200 + 1 for t in prompt])
            ttfts.append(result.ttft_ms)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return time.perf_counter() - started, ttfts


async def closed_loop(
    address: str, requests: int, concurrency: int, tokens: int, *, warmup: int
) -> tuple[float, list[float]]:
    """``run_closed_loop`` with a client of the cluster at ``address``."""
    async with AsapClient(address, timeout_s=120) as client:
        return await run_closed_loop(client, requests, concurrency, tokens, warmup=warmup)
