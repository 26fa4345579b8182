"""Does an attention rank keep anything per request? tracemalloc in the attention service's own process.

Expert ranks in processes of their own on the fast plane (the tiny model, CPU), the attention service in
this process with ``tracemalloc`` on, driven one of two ways:

    --via executor    batches of 1-3 prompts straight into the executor, two at a time (the hot path)
    --via scheduler   a scheduler process in front of it and an open-loop client process (``--rate``):
                      what a cluster's attention rank runs (the ``Run`` stream, ``server.py``)

After ``--warmup-s`` of load a snapshot is taken, then one after each ``--block-s`` block; printed per
block: the prompts served, the Python heap tracemalloc sees, RSS, and the allocation sites (innermost
frame) that grew most since the warm-up snapshot, with bytes per prompt; at the end the top sites with
their tracebacks and the live objects per type that grew (``gc``).

    python benchmarks/attention_memory.py --via scheduler --rate 20 --blocks 4 --block-s 60
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import os
import random
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A snapshot holds the GIL for a while (seconds with deep tracebacks): no process here may take that for a
# frozen peer (the scheduler's health probe, the fast plane's heartbeats, gRPC keepalive). Read at import.
os.environ.setdefault("ASAP_FAULT_BOUND_S", "60")

from asap.model.resolve import model_argument
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from tests.procs import ServiceProcess

# tracemalloc's own bookkeeping and this script's snapshots are not the service's
_IGNORE = (tracemalloc.__file__, __file__, "<frozen importlib._bootstrap>", "<unknown>")


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


def malloc_mib() -> tuple[float, float, float]:
    """glibc's heap (every arena): bytes in use (mmapped chunks included), bytes free but held, and the
    heap's footprint (what it took from the system: arenas plus mmapped chunks), MiB.
    Native allocations (torch, grpc core) that tracemalloc does not see land here; RSS growing while
    "in use" stays flat is the allocator keeping freed memory, not a leak."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20, (info.arena + info.hblkhd) / 2**20


def _filtered(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    return snapshot.filter_traces([tracemalloc.Filter(False, name) for name in _IGNORE])


def _growing(
    snap: tracemalloc.Snapshot, base: tracemalloc.Snapshot, key: str
) -> list[tracemalloc.StatisticDiff]:
    """The sites of ``snap`` that hold more than in ``base``, most growth first."""
    grown = [s for s in snap.compare_to(base, key) if s.size_diff > 0]
    return sorted(grown, key=lambda s: -s.size_diff)


def _type_counts() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


@contextlib.asynccontextmanager
async def attention_rank(
    experts: int, model: str
) -> AsyncIterator[tuple[AttentionService, list[ServiceProcess]]]:
    """``experts`` expert ranks as processes on the fast plane, an attention service here (bound);
    yields it and the expert processes."""
    common = ["--model", model, "--port", "0", "--num-ranks", str(experts), "--data-plane", "fast"]
    procs = [
        ServiceProcess(f"expert-{r}", ["-m", "expert_svc", *common, "--rank", str(r)]) for r in range(experts)
    ]
    try:
        targets = [p.wait_ready() for p in procs]
        service = AttentionService(
            AttentionServiceConfig(model=model, expert_targets=targets, data_plane="fast")
        )
        await service.start()
        try:
            yield service, procs
        finally:
            await service.stop(grace_s=0)
    finally:
        for p in procs:
            p.stop()


async def executor_load(service: AttentionService, stop: asyncio.Event) -> None:
    """Two callers, each a batch of 1-3 prompts of 16-96 tokens after another, until ``stop``."""
    executor = service.executor
    assert executor is not None
    rng = random.Random(1)
    count = 0

    async def caller() -> None:
        nonlocal count
        while not stop.is_set():
            count += 1
            prompts = [
                executor.make_prompt(
                    f"r{count}-{i}", [rng.randrange(256) for _ in range(rng.randint(16, 96))]
                )
                for i in range(rng.randint(1, 3))
            ]
            await executor.run_batch(prompts)

    await asyncio.gather(caller(), caller())


def client_main(target: str, rate: float) -> None:
    """The open-loop client process: Poisson arrivals at ``rate`` until its stdin closes."""
    from asap.client import AsapClient

    async def run() -> None:
        rng = random.Random(2)
        loop = asyncio.get_running_loop()
        closed = loop.run_in_executor(None, sys.stdin.read)
        tasks: set[asyncio.Task[object]] = set()
        async with AsapClient(target, timeout_s=30.0, retries=0) as client:
            while not closed.done():
                tokens = [rng.randrange(256) for _ in range(rng.randint(16, 96))]
                task = asyncio.create_task(client.prefill(tokens=tokens))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(rng.expovariate(rate))
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


class _Probe:
    """What one look at the process sees: prompts served, Python heap (tracemalloc), malloc, RSS."""

    def __init__(self, prompts: int, traced: bool, collect: bool = False) -> None:
        if collect:  # reference cycles the cyclic collector has not reached yet are not held memory
            gc.collect()
        self.prompts = prompts
        took = time.perf_counter()
        self.snapshot = _filtered(tracemalloc.take_snapshot()) if traced else None
        self.took_s = time.perf_counter() - took
        self.heap = sum(s.size for s in self.snapshot.statistics("filename")) if self.snapshot else 0
        self.malloc_in_use, self.malloc_free, self.malloc_footprint = malloc_mib()
        self.rss = rss_mib()

    def line(self, base: _Probe) -> str:
        prompts = self.prompts - base.prompts
        heap = self.heap - base.heap
        in_use = self.malloc_in_use - base.malloc_in_use
        python = (
            f"Python heap {heap / 1024:+.1f} KiB ({heap / max(prompts, 1):+.1f} B/prompt), "
            if self.snapshot is not None
            else ""
        )
        return (
            f"+{prompts} prompts, {python}malloc in use {self.malloc_in_use:.1f} MiB ({in_use:+.2f}, "
            f"{in_use * 2**20 / max(prompts, 1):+.0f} B/prompt), malloc free held {self.malloc_free:.1f} MiB, "
            f"malloc footprint {self.malloc_footprint:.1f} MiB, "
            f"RSS {self.rss:.1f} MiB ({self.rss - base.rss:+.1f}); load average "
            f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
        )


async def main(args: argparse.Namespace) -> None:
    model = model_argument("tiny")
    traced = args.frames > 0
    if traced:
        tracemalloc.start(args.frames)
    async with attention_rank(args.experts, model) as (service, experts):
        executor = service.executor
        assert executor is not None
        stop = asyncio.Event()
        procs: list[ServiceProcess] = []
        client: asyncio.subprocess.Process | None = None
        load: asyncio.Future[None] | None = None
        if args.via == "executor":
            load = asyncio.ensure_future(executor_load(service, stop))
        else:
            scheduler = ServiceProcess(
                "scheduler",
                ["-m", "scheduler_svc", "--model", model, "--port", "0", "--attention", service.address,
                 "--mode", args.mode],
            )  # fmt: skip
            procs.append(scheduler)
            # off the loop: the scheduler asks this attention rank for its state while it starts
            target = await asyncio.get_running_loop().run_in_executor(None, scheduler.wait_ready)
            client = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--client",
                target,
                "--rate",
                str(args.rate),
                stdin=asyncio.subprocess.PIPE,
                env=dict(os.environ, ASAP_TORCH_THREADS="1"),
            )
        try:
            await asyncio.sleep(args.warmup_s)
            base_types = _type_counts() if traced else collections.Counter()
            base = _Probe(executor.stats.prompts, traced, args.collect)
            print(f"after warm-up: {base.line(_Probe(0, False))}", flush=True)
            last = base
            for block in range(1, args.blocks + 1):
                await asyncio.sleep(args.block_s)
                last = _Probe(executor.stats.prompts, traced, args.collect)
                print(f"block {block}: {last.line(base)}", flush=True)
                if last.snapshot is None or base.snapshot is None:
                    continue
                for stat in _growing(last.snapshot, base.snapshot, "lineno")[: args.top]:
                    frame = stat.traceback[0]
                    print(
                        f"    {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks "
                        f"({stat.size_diff / max(last.prompts - base.prompts, 1):+7.1f} B/prompt) "
                        f"{frame.filename}:{frame.lineno}"
                    )
            if last.snapshot is not None and base.snapshot is not None:
                print(f"\ntop growing sites with their tracebacks ({last.prompts - base.prompts} prompts):")
                for stat in _growing(last.snapshot, base.snapshot, "traceback")[:3]:
                    print(f"  {stat.size_diff / 1024:+.1f} KiB {stat.count_diff:+d} blocks")
                    for line in stat.traceback.format()[-2 * args.frames :]:
                        print("    " + line)
                grown = _type_counts() - base_types
                print(
                    "live objects that grew, by type: "
                    + ", ".join(f"{n} +{c}" for n, c in grown.most_common(12))
                )
            if args.exit_abruptly:
                # under heaptrack: what is still allocated at exit is what the process held at the end (no
                # teardown frees it). The load stops and its batches finish first, so none is in flight;
                # then the expert processes go, synchronously
                stop.set()
                if load is not None:
                    await load
                while executor.inflight:  # noqa: ASYNC110 (a counter, not an event: polled briefly)
                    await asyncio.sleep(0.1)
                gc.collect()
                for p in procs + experts:
                    p.stop(timeout_s=5)
                sys.stdout.flush()
                os._exit(0)
        finally:
            stop.set()
            if client is not None:
                assert client.stdin is not None
                client.stdin.close()
                await asyncio.wait_for(client.wait(), 60)
            if load is not None:
                await load
            for p in procs:
                p.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--via", choices=("executor", "scheduler"), default="scheduler")
    parser.add_argument("--experts", type=int, default=2, help="expert rank processes (default 2)")
    parser.add_argument("--mode", default="async", help="the scheduler's mode (--via scheduler)")
    parser.add_argument("--rate", type=float, default=20.0, help="client requests/s (--via scheduler)")
    parser.add_argument("--warmup-s", type=float, default=30.0, help="load before the first snapshot")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-s", type=float, default=60.0, help="seconds of load per block")
    parser.add_argument(
        "--frames",
        type=int,
        default=8,
        help="tracemalloc frames per allocation (0: no tracemalloc, malloc and RSS only)",
    )
    parser.add_argument("--top", type=int, default=8, help="growing sites printed per block")
    parser.add_argument("--collect", action="store_true", help="gc.collect() before every look")
    parser.add_argument(
        "--exit-abruptly",
        action="store_true",
        help="end with os._exit after the last block (under heaptrack: what is left allocated is what was held)",
    )
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        client_main(args.client, args.rate)
        return
    import torch

    torch.set_num_threads(1)
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
