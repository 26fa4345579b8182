"""Faults under load, with real processes (DESIGN §12): a local cluster on the fast plane (what one host
selects) in async mode takes a SIGKILL of an expert rank (restarted on its address) and a SIGSTOP of an
attention rank (then SIGCONT) while Poisson load runs. Calls that needed the lost rank fail with
UNAVAILABLE, nothing hangs or goes unanswered, nothing else fails, and the rank is taken back without
restarting the cluster. ``asap up --restart on-failure`` restarts a killed child itself.

The full matrix (both kinds, both signals, async and sync, fast and gRPC planes) with its figures is
``benchmarks/faults.py``; the time bound is measured there, not asserted here.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from asap.bench.faultload import OK, Load, open_loop, summarize
from asap.child_process import ChildProcess
from asap.client import AsapClient
from asap.cluster import ClusterSpec, LocalCluster, RankSpec
from tests.waiting import until

pytestmark = pytest.mark.slow

RATE = 6.0  # calls per second: well under the capacity of this cluster on a shared 2-core host


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(256) for _ in range(rng.randint(8, 48))]


def _child(cluster: LocalCluster, name: str) -> ChildProcess:
    return next(c for c in cluster.children if c.name == name)


async def _until_served(client: AsapClient, *, on_rank: int | None, ranks: set[int]) -> None:
    """Until calls succeed (on ``on_rank``, or on every rank of ``ranks``); four at a time, so that
    placement spreads them over the ranks."""

    async def served() -> bool:
        try:
            results = await asyncio.gather(
                *(client.prefill(tokens=[3, 4, 5 + i], timeout_s=10) for i in range(4))
            )
        except Exception:
            return False
        seen = {r.attention_rank for r in results}
        return (on_rank is not None and on_rank in seen) or (on_rank is None and seen >= ranks)

    assert await until(served, timeout_s=120, interval_s=0.2), (
        f"not served (on rank {on_rank}, ranks {ranks})"
    )


async def _fault(cluster: LocalCluster, client: AsapClient, name: str, how: str) -> None:
    load = Load()
    stop = False
    runner = asyncio.create_task(
        open_loop(client, RATE, lambda: stop, prompt=_prompt, deadline_s=30.0, seed=len(name), load=load)
    )
    started = time.monotonic()
    await asyncio.sleep(2.0)
    child = _child(cluster, name)
    fault_at = time.monotonic()
    child.send(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    await asyncio.sleep(4.0)
    if how == "kill":
        await asyncio.to_thread(child.proc.wait, 10)
        await asyncio.to_thread(cluster.restart, name)
    else:
        child.send(signal.SIGCONT)
    rank = int(name.rsplit("-", 1)[1])
    await _until_served(client, on_rank=rank if name.startswith("attention") else None, ranks={0, 1})
    settled_at = time.monotonic()
    await asyncio.sleep(2.0)
    stop = True
    await runner
    figures = summarize(load, fault_at=fault_at, before_from=started, settled_at=settled_at)
    assert figures.lost == 0 and figures.hangs == 0, figures
    assert set(figures.statuses) <= {OK, "UNAVAILABLE"}, figures
    assert figures.failed_outside == 0, (figures, [c.message for c in load.calls if c.status != OK])
    assert figures.ok > 0
    assert all(c.proc.poll() is None for c in cluster.children), "a service crashed"


async def test_killed_expert_and_frozen_attention_rank_under_load_on_the_fast_plane() -> None:
    spec = ClusterSpec(
        model="tiny", attention=2, experts=2, port=0,
        attention_ranks=[RankSpec(extra_args=["--data-plane", "auto"]) for _ in range(2)],
    )  # fmt: skip
    cluster = LocalCluster(spec, out=io.StringIO())
    await asyncio.to_thread(cluster.start)
    try:
        assert cluster.address is not None
        async with AsapClient(cluster.address, timeout_s=30, retries=0) as client:
            await _until_served(client, on_rank=None, ranks={0, 1})
            await _fault(cluster, client, "expert-1", "kill")
            await _fault(cluster, client, "attention-1", "stop")
    finally:
        for child in cluster.children:
            child.send(signal.SIGCONT)
        await asyncio.to_thread(cluster.stop)


def test_up_restarts_a_killed_child_on_failure(qwen3_dir: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", ASAP_LOG_LEVEL="WARNING")
    up = subprocess.Popen(
        [sys.executable, "-m", "asap.cli", "up", "--model", str(qwen3_dir), "--port", "0", "--attention", "1",
         "--experts", "1", "--restart", "on-failure"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    seen = threading.Condition()

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            with seen:
                lines.append(line.rstrip("\n"))
                seen.notify_all()

    threading.Thread(target=read, daemon=True).start()

    def wait_for(pattern: str) -> re.Match[str]:
        with seen:
            assert seen.wait_for(lambda: any(re.search(pattern, line) for line in lines), 180), lines[-30:]
            return next(m for line in lines if (m := re.search(pattern, line)))

    try:
        address = wait_for(r"^ready: scheduler at (\S+)$").group(1)
        expert_at = wait_for(r"^\[expert-0\] serving .* at (\S+)$").group(1)
        pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_expert_child(int(p), up.pid))
        os.kill(pid, signal.SIGKILL)
        wait_for(r"expert-0 exited with code -9; restarting it in 1\.0 s")
        assert wait_for(r"expert-0 restarted at (\S+)").group(1) == expert_at  # the same address

        async def served() -> int:
            async with AsapClient(address, timeout_s=30, retries=3) as client:
                return (await client.prefill(tokens=[1, 2, 3])).prompt_tokens

        assert asyncio.run(served()) == 3
        assert up.poll() is None
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        if up.stdout is not None:
            up.stdout.close()


def _is_expert_child(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return int(stat[1]) == parent and b"expert" in cmdline
