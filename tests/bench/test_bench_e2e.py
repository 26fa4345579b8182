"""``asap bench --compare`` end to end: a real local cluster of the tiny model, started by the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asap.cli import main

pytestmark = pytest.mark.slow


def test_compare_async_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plot, log = tmp_path / "bench.json", tmp_path / "bench.png", tmp_path / "cluster.log"
    argv = [
        "bench", "--compare", "async", "--attention", "1", "--experts", "1",
        "--sweep", "4,8", "--requests", "20", "--warmup", "2", "--lengths", "uniform:8,256",
        "--slo-ttft-ms", "2000", "--timeout", "30", "--seed", "5",
        "--json", str(out), "--plot", str(plot), "--cluster-log", str(log),
    ]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert set(document) >= {"modes", "ratios", "config", "workload", "compute"}
    assert document["config"]["cluster"] == {"attention": 1, "experts": 1}
    run = document["modes"]["async"]
    assert run["error"] is None and run["cluster"]["mode"] == "async"
    assert [r["rate_rps"] for r in run["results"]] == [4.0, 8.0]
    for result in run["results"]:
        assert result["requests"] == 20 and result["warmup"] == 2
        assert result["completed"] + result["failed"] == result["requests"]
        assert result["completed"] > 0
        ttft = result["ttft_ms"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
        assert 0 <= result["slo_attainment"] <= 1
        assert result["goodput_rps"] <= result["throughput_rps"]
        assert result["server_ttft_ms"]["mean"] <= ttft["mean"]
    assert run["max_slo_rps"] in (None, 4.0, 8.0)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "[scheduler]" in log.read_text()
    assert "max SLO-compliant RPS" in capsys.readouterr().out


def test_compare_over_http_starts_the_front_door(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "bench", "--compare", "async", "--protocol", "http", "--attention", "1", "--experts", "1",
        "--rate", "8", "--requests", "10", "--warmup", "1", "--lengths", "uniform:8,64", "--seed", "5",
        "--json", str(out), "--cluster-log", str(tmp_path / "cluster.log"), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert document["config"]["protocol"] == "http"
    (result,) = document["modes"]["async"]["results"]
    assert result["completed"] == 10 and result["failed"] == 0
