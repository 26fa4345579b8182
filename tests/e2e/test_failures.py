"""Failures across processes: a child dying during start-up, an attention rank dying under load."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asap.client import AsapClient, Unavailable
from tests.procs import ServiceProcess, start_cluster_services
from tests.waiting import until

pytestmark = pytest.mark.slow


def test_up_fails_loudly_with_the_childs_error(qwen3_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(qwen3_dir / "config.json", broken / "config.json")  # no weights
    done = subprocess.run(
        [sys.executable, "-m", "asap.cli", "up", "--model", str(broken), "--port", "0", "--attention", "1",
         "--experts", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "expert-0 exited with code" in done.stderr
    assert "holds no *.safetensors file" in done.stderr, done.stderr


async def test_a_dead_attention_rank_is_taken_out_of_placement(qwen3_dir: Path) -> None:
    attention, experts = start_cluster_services(qwen3_dir, attention=2, experts=1)
    targets = ",".join(p.address for p in attention)
    scheduler = ServiceProcess(
        "scheduler",
        ["-m", "scheduler_svc", "--model", str(qwen3_dir), "--port", "0", "--attention", targets,
         "--cost", "0.01,0.00001,1"],
    )  # fmt: skip
    try:
        address = scheduler.wait_ready()
        async with AsapClient(address, timeout_s=60, retries=0) as client:
            warm = await asyncio.gather(*(client.prefill(tokens=[i, i + 1, i + 2]) for i in range(20)))
            assert {r.attention_rank for r in warm} == {0, 1}

            attention[1].kill()
            killed_at = time.monotonic()
            outcomes = await asyncio.gather(
                *(client.prefill(tokens=[5] * (50 + i)) for i in range(20)), return_exceptions=True
            )
            assert time.monotonic() - killed_at < 30, "requests on a dead rank must fail fast, not hang"
            for outcome in outcomes:
                assert not isinstance(outcome, BaseException) or isinstance(outcome, Unavailable), outcome

            # once the health monitor has noticed, everything lands on the live rank
            async def rank_1_marked_down() -> bool:
                return not (await client.cluster_state()).attention_ranks[1].healthy

            await until(rank_1_marked_down, timeout_s=10, interval_s=0.2)
            state = await client.cluster_state()
            assert not state.attention_ranks[1].healthy and state.attention_ranks[0].healthy
            after = await asyncio.gather(*(client.prefill(tokens=[9] * (10 + i)) for i in range(10)))
            assert {r.attention_rank for r in after} == {0}
    finally:
        for proc in (scheduler, *attention, *experts):
            proc.stop()
