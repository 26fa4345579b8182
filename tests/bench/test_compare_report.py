"""--compare machinery with a fake cluster factory, the JSON documents, the table, the plot, the CLI."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from asap.bench.compare import run_compare
from asap.bench.report import compare_document, format_table, write_json, write_plot
from asap.bench.sweep import BenchConfig
from asap.bench.workload import LengthSpec, WorkloadSpec
from asap.cli import main
from asap.cluster import ClusterSpec
from asap.errors import Unavailable
from tests.client.fake_scheduler import FakeSchedulerThread

RATE_KEYS = {
    "rate_rps", "requests", "completed", "failed", "failures", "throughput_rps", "throughput_tok_s",
    "ttft_ms", "slo_attainment", "goodput_rps", "offered_rps", "server_ttft_ms", "queue_ms",
    "client_lag_ms", "warmup", "sequence", "host_cpu_busy", "warnings",
}  # fmt: skip
TRACE = Path(__file__).parents[1] / "data" / "trace_small.csv"


class FakeCluster:
    """Serves the fake scheduler while started; a mode listed in ``broken`` fails to start."""

    def __init__(
        self, spec: ClusterSpec, served: FakeSchedulerThread, broken: set[str], log: list[str]
    ) -> None:
        self.spec, self.served, self.broken, self.log = spec, served, broken, log

    def start(self) -> str:
        self.log.append(f"start {self.spec.mode}")
        if self.spec.mode in self.broken:
            raise Unavailable(f"scheduler of {self.spec.mode} exited with code 1")
        return self.served.target

    def stop(self) -> None:
        self.log.append(f"stop {self.spec.mode}")


@pytest.fixture
def served() -> Iterator[FakeSchedulerThread]:
    with FakeSchedulerThread() as fake:
        fake.fake.delay_s = 0.02
        yield fake


def compare(
    served: FakeSchedulerThread, modes: list[str], broken: set[str]
) -> tuple[dict[str, Any], list[str]]:
    events: list[str] = []
    specs: list[ClusterSpec] = []

    def factory(spec: ClusterSpec, out: TextIO) -> FakeCluster:
        specs.append(spec)
        return FakeCluster(spec, served, broken, events)

    workload = WorkloadSpec(lengths=LengthSpec.parse("uniform:1,300"), requests=10, warmup=1, seed=9)
    config = BenchConfig(workload=workload, rates=[20.0, 40.0], slo_ttft_ms=2000, progress=False)
    sweeps = run_compare(
        modes,
        {"attention": 3, "experts": None, "dtype": "float32"},
        config,
        log=io.StringIO(),
        factory=factory,
    )
    assert all(s.port == 0 and s.attention == 3 and s.experts == 2 for s in specs)
    document = compare_document(sweeps, config.describe(), workload.describe())
    return json.loads(json.dumps(document, allow_nan=False)), events


def test_compare_runs_each_mode_in_turn_on_the_same_sequence(served: FakeSchedulerThread) -> None:
    document, events = compare(served, ["async", "sync-chunked"], broken=set())
    assert events == ["start async", "stop async", "start sync-chunked", "stop sync-chunked"]
    assert set(document) == {"modes", "ratios", "compute", "emulated", "config", "workload"}
    assert list(document["modes"]) == ["async", "sync-chunked"]
    assert document["compute"] == "torch" and document["emulated"] is False
    digests = []
    for mode in document["modes"].values():
        assert mode["error"] is None and mode["max_slo_rps"] == 40.0
        assert mode["cluster"]["attention_ranks"] == 2  # what the (fake) scheduler reports
        assert [r["rate_rps"] for r in mode["results"]] == [20.0, 40.0]
        for result in mode["results"]:
            assert set(result) == RATE_KEYS
            assert result["completed"] + result["failed"] == result["requests"] == 10
            ttft = result["ttft_ms"]
            assert ttft["p50"] <= ttft["p90"] <= ttft["p99"]
        digests.append([r["sequence"] for r in mode["results"]])
    assert digests[0] == digests[1]
    assert document["ratios"]["async/sync-chunked"]["max_slo_rps"] == 1.0
    assert document["workload"]["lengths"] == "uniform:1,300"


def test_a_mode_that_fails_to_start_is_recorded_not_fatal(
    served: FakeSchedulerThread, tmp_path: Path
) -> None:
    document, events = compare(served, ["async", "sync"], broken={"sync"})
    assert events == ["start async", "stop async", "start sync"]
    assert document["modes"]["sync"]["error"].startswith("cluster start failed: scheduler of sync exited")
    assert document["modes"]["sync"]["results"] == [] and document["modes"]["sync"]["max_slo_rps"] is None
    assert document["modes"]["async"]["max_slo_rps"] == 40.0
    assert document["ratios"]["async/sync"] == {"max_slo_rps": None, "ttft_mean_at_lowest_rate": None}


def test_emulated_runs_are_labelled(served: FakeSchedulerThread, tmp_path: Path) -> None:
    workload = WorkloadSpec(lengths=LengthSpec.parse("fixed:10"), requests=5, seed=1)
    config = BenchConfig(workload=workload, rates=[50.0], progress=False)

    def factory(spec: ClusterSpec, out: TextIO) -> FakeCluster:
        return FakeCluster(spec, served, set(), [])

    sweeps = run_compare(["async"], {}, config, log=io.StringIO(), factory=factory)
    sweeps["async"].compute = "emulated:h200"  # as run_compare labels a run given --compute emulated:h200
    document = compare_document(sweeps, config.describe(), workload.describe())
    assert document["emulated"] is True and document["modes"]["async"]["emulated"] is True
    table = format_table(sweeps, config.slo_ttft_ms)
    assert table.splitlines()[0].startswith("EMULATED (emulated:h200) asap bench:")
    write_json(document, tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text())["compute"] == "emulated:h200"
    write_plot(sweeps, config.slo_ttft_ms, tmp_path / "out.png")
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_against_a_target(
    served: FakeSchedulerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--target", served.target, "--trace", str(TRACE), "--sweep", "30,60", "--requests", "15"]
    assert main([*argv, "--warmup", "3", "--slo-ttft-ms", "1500", "--json", str(out), "--no-progress"]) == 0
    document = json.loads(out.read_text())
    assert set(document) == {
        "target",
        "compute",
        "emulated",
        "max_slo_rps",
        "results",
        "cluster",
        "config",
        "workload",
    }
    assert document["workload"]["arrival"] == "trace" and document["workload"]["warmup"] == 3
    assert document["max_slo_rps"] == 60.0
    assert [r["requests"] for r in document["results"]] == [15, 15]
    printed = capsys.readouterr().out
    assert "max SLO-compliant RPS" in printed and "async" in printed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--burstiness", "2"], "--burstiness applies to --arrival gamma"),
        (["--attention", "2"], "apply only with --compare"),
        (["--arrival", "trace"], "needs --trace"),
    ],
)
def test_cli_refuses_bad_combinations(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--target", "127.0.0.1:1", *flags]) == 2
    assert message in capsys.readouterr().err
