"""Host-cost knobs and start-up reuse of the simulator: the per-barrier host cost, one calibration per
mode across its tuned variants."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from asap.bench.sweep import BenchConfig
from asap.bench.workload import LengthSpec, WorkloadSpec
from asap.sim.cluster import Layout
from asap.sim.hostcost import HostCostBarrier
from asap.sim.loop import run
from asap.sim.run import Tuning, simulate_compare
from asap.syncstep import SyncStep


@pytest.mark.parametrize("host_s", [0.0, 0.004])
def test_a_released_group_leaves_together_host_s_later(host_s: float) -> None:
    async def main() -> list[tuple[float, int]]:
        barrier = HostCostBarrier(host_s)
        loop = asyncio.get_running_loop()
        step = SyncStep(step=1, participants=2)

        async def chunk(rank: int, delay: float) -> tuple[float, int]:
            await asyncio.sleep(delay)
            waited = await barrier.wait(sync=step, layer=0, attention_rank=rank, rows=3, total_rows=3)
            return loop.time(), waited

        return list(await asyncio.gather(chunk(0, 0.0), chunk(1, 0.010)))

    (first, second), _ = run(main())
    assert first[0] == second[0] == pytest.approx(0.010 + host_s)
    assert first[1] == pytest.approx((0.010 + host_s) * 1e9, abs=1e3)  # waited for the other and the host
    assert second[1] == pytest.approx(host_s * 1e9, abs=1e3)


@pytest.fixture()
def model(qwen3_dir: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(qwen3_dir / "config.json", directory / "config.json")
    return directory


def test_tuned_variants_share_one_calibration(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler_svc.calibration as calibration

    calls: list[int] = []
    real = calibration.calibrate_cost_model

    async def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(calibration, "calibrate_cost_model", counted)
    workload = WorkloadSpec(lengths=LengthSpec.parse("uniform:16,64"), requests=4, warmup=0, seed=1)
    config = BenchConfig(workload=workload, rates=[20.0], slo_ttft_ms=1000, progress=False)
    fields = {"model": str(model), "attention": 2, "experts": 2, "compute": "emulated:h200"}
    sweeps, _ = simulate_compare(
        ["sync-chunked"], fields, config, Layout(), Tuning({"sync-chunked": [64, 128, 256]})
    )
    assert len(calls) == 1
    assert sweeps["sync-chunked"].error is None
    assert set(sweeps["sync-chunked"].cluster["tuned"]["max_slo_rps_by_value"]) == {"64", "128", "256"}
