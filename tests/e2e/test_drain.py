"""Graceful drain under load (DESIGN §5, §12): SIGTERM to ``asap up`` while requests are in flight.

The calls in flight complete (or fail typed, had the drain deadline passed), calls sent during the drain
get UNAVAILABLE, ``asap up`` exits 0, no service process outlives it and no shared-memory segment of the
cluster is left in /dev/shm.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from asap.client import AsapClient
from asap.errors import AsapError, Unavailable
from asap.rpc.health import check_health_async
from tests.waiting import until

pytestmark = pytest.mark.slow

_READY = re.compile(r"^ready: scheduler at (\S+)$")


def _shm() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("asap_")}


def _processes_with(marker: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.add(int(entry))
            except OSError:
                continue
    return found


def test_sigterm_under_load_drains_and_leaves_nothing_behind(qwen3_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"  # a path of this test's own, to find every process of this cluster by it
    shutil.copytree(qwen3_dir, model)
    shm_before = _shm()
    env = dict(os.environ, PYTHONUNBUFFERED="1", ASAP_LOG_LEVEL="WARNING")
    up = subprocess.Popen(
        [sys.executable, "-m", "asap.cli", "up", "--model", str(model), "--port", "0", "--attention", "2",
         "--experts", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line.rstrip("\n"))
            if _READY.match(lines[-1]):
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(240)
        address = next(m.group(1) for line in lines if (m := _READY.match(line)))
        services = _processes_with(str(model)) - {up.pid}
        assert len(services) == 5, services
        outcomes, refused = asyncio.run(_load_through_sigterm(address, up))
        finished = [o for o in outcomes if not isinstance(o, BaseException)]
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, AsapError) for o in failed), failed  # typed, never a bare error
        assert finished, "the drain let no request in flight finish"
        assert all(isinstance(o, Unavailable) for o in refused), refused
        assert up.wait(90) == 0
        asyncio.run(until(lambda: not _processes_with(str(model)), timeout_s=10, interval_s=0.2))
        assert not _processes_with(str(model)), "a service outlived asap up"
        assert _shm() - shm_before <= _other_users_segments(shm_before), "shared memory left behind"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(30)
        reader.join(5)
        if up.stdout is not None:
            up.stdout.close()


async def _load_through_sigterm(
    address: str, up: subprocess.Popen[str]
) -> tuple[list[object | BaseException], list[object | BaseException]]:
    """Requests in flight when ``up`` gets SIGTERM, and requests sent during its drain."""
    async with AsapClient(address, timeout_s=60, retries=0) as client:
        await client.prefill(tokens=[1, 2, 3])
        in_flight = [
            asyncio.create_task(client.prefill(tokens=[(7 * i + j) % 256 for j in range(200 + 10 * i)]))
            for i in range(24)
        ]

        # SIGTERM once the scheduler has work in flight (or, on a fast host, all of it is already done).
        async def working() -> bool:
            state = await client.cluster_state()
            queued = sum(r.queued_requests + r.running_batches for r in state.attention_ranks)
            return state.pending_requests + queued > 0 or all(t.done() for t in in_flight)

        assert await until(working, timeout_s=30, interval_s=0.02)
        up.send_signal(signal.SIGTERM)
        # SIGTERM turns the scheduler's grpc health NOT_SERVING, then its drain refuses new work.
        async with grpc.aio.insecure_channel(address) as channel:
            draining = await until(lambda: _not_serving(channel), timeout_s=30, interval_s=0.02)
        assert draining, "the scheduler never began to drain"
        refused = await asyncio.gather(
            *(client.prefill(tokens=[5, 6]) for _ in range(5)), return_exceptions=True
        )
        outcomes = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), 90)
    return list(outcomes), list(refused)


async def _not_serving(channel: grpc.aio.Channel) -> bool:
    serving, _ = await check_health_async(channel)
    return not serving


def _other_users_segments(before: set[str]) -> set[str]:
    """Segments that appeared meanwhile but belong to processes still running (other clusters on this
    host, e.g. another test run): only those may remain."""
    alive = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            maps = Path(f"/proc/{entry}/maps").read_text()
        except OSError:
            continue
        alive.update(line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/dev/shm/asap_" in line)
    return alive - before
