"""``asap simulate`` end to end on a small model: the bench document, tuned baselines, layouts, help."""

from __future__ import annotations

import json
import pstats
import shutil
from pathlib import Path
from typing import Any

import pytest

from asap.bench.workload import LengthSpec, WorkloadSpec, build_requests, sequence_digest
from asap.cli import main
from asap.commands import simulate

WORKLOAD = ["--lengths", "uniform:16,200", "--sweep", "20,80", "--requests", "12", "--warmup", "2"]


@pytest.fixture(scope="module")
def model(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sim") / "model"
    directory.mkdir()
    shutil.copy(qwen3_dir / "config.json", directory / "config.json")  # emulated: no weights needed
    return directory


def _simulate(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    argv = [
        "simulate", "--model", str(model), "--attention", "2", "--experts", "2", *WORKLOAD,
        "--slo-ttft-ms", "50", "--seed", "5", "--no-progress", "--json", str(out), *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def test_compare_writes_the_bench_document(model: Path, tmp_path: Path) -> None:
    document = _simulate(
        model, tmp_path / "a.json", "--compare", "async,sync-chunked,sync", "--tune-chunk-tokens", "64,128"
    )
    assert document["simulated"] is True and document["emulated"] is True
    assert set(document["modes"]) == {"async", "sync-chunked", "sync"}
    assert set(document["ratios"]) == {"async/sync", "async/sync-chunked"}
    expected = WorkloadSpec(lengths=LengthSpec.parse("uniform:16,200"), requests=12, warmup=2, seed=5)
    for mode, run in document["modes"].items():
        assert run["error"] is None
        assert run["cluster"]["simulated"] is True and run["cluster"]["layout"] == "disaggregated"
        assert run["cluster"]["devices"] == 4
        for result in run["results"]:
            assert result["failed"] == 0 and result["completed"] == 12, result["failures"]
            ttft = result["ttft_ms"]
            assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
            requests = build_requests(expected, result["rate_rps"], max_prompt_tokens=10**6)
            assert result["sequence"] == sequence_digest(requests, 5), mode  # bench's own sequence
        stats = document["simulation"]["runs"][mode]
        assert stats["events"] > 0 and stats["virtual_s"] > 0
        roles, hottest = stats["device_busy_by_role"], stats["rank_busy_max_by_role"]
        assert set(roles) == set(hottest) == {"attention", "experts"}
        for role, busy in roles.items():
            assert 0 < busy <= hottest[role] <= 1, (mode, role)
        # disaggregated, 2 + 2 devices: the roles' means average to the devices' mean
        assert (roles["attention"] + roles["experts"]) / 2 == pytest.approx(stats["device_busy"], abs=1e-3)
    tuned = document["modes"]["sync-chunked"]["cluster"]["tuned"]
    assert tuned["flag"] == "--chunk-tokens" and tuned["best"] in (64, 128)
    assert set(tuned["max_slo_rps_by_value"]) == {"64", "128"}


def test_colocated_with_attention_tp_shares_devices(model: Path, tmp_path: Path) -> None:
    document = _simulate(
        model, tmp_path / "c.json", "--compare", "sync", "--layout", "colocated", "--attention-tp", "2"
    )
    run = document["modes"]["sync"]
    assert run["error"] is None
    assert (run["cluster"]["layout"], run["cluster"]["attention_tp"], run["cluster"]["devices"]) == (
        "colocated",
        2,
        4,  # 2 attention ranks x 2 devices; the 2 expert ranks on those devices
    )
    assert all(result["failed"] == 0 for result in run["results"])
    stats = document["simulation"]["runs"]["sync"]
    # colocated: the 2 expert ranks sit on 2 of the attention ranks' 4 devices; the roles' device-time
    # adds up to the devices' busy time
    shares = stats["device_busy_by_role"]
    assert shares["attention"] > 0 and shares["experts"] > 0
    held = 4 * shares["attention"] + 2 * shares["experts"]
    assert held == pytest.approx(4 * stats["device_busy"], abs=4e-3)
    breakdown = document["simulation"]["runs"]["sync"]["ttft_breakdown"]
    assert breakdown["classes"]["all"]["requests"] == 28  # (12 + 2 warm-up) x 2 rates, with their waits
    assert all(0 <= r["barrier_ms"] <= r["expert_wait_ms"] for r in breakdown["requests"])


def test_help_documents_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--layout", "--attention-tp", "--tune-chunk-tokens", "--compare", "--trace", "--profile"):
        assert flag in text


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_profile_writes_the_simulators_profile_with_either_clock(
    model: Path,
    tmp_path: Path,
    clock: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = [0]
    real = simulate.PROFILE_CLOCKS[clock]

    def counted() -> float:
        reads[0] += 1
        return real()

    monkeypatch.setitem(simulate.PROFILE_CLOCKS, clock, counted)
    out = tmp_path / "sim.prof"
    _simulate(
        model, tmp_path / "p.json", "--compare", "async", "--profile", str(out), "--profile-clock", clock
    )
    functions = {name for _file, _line, name in pstats.Stats(str(out)).stats}  # type: ignore[attr-defined]
    assert {"_run_once", "run_batch"} <= functions  # the virtual loop, and the services' code it drives
    assert reads[0] > 1000  # the chosen clock timed it
    assert "Ordered by: internal time" in capsys.readouterr().err  # the top entries, printed


def test_an_unknown_profile_clock_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--profile", "x.prof", "--profile-clock", "gpu"])
    assert exit_info.value.code == 2
    assert "--profile-clock" in capsys.readouterr().err


def test_ports_charge_a_rank_its_total_bytes(model: Path, tmp_path: Path) -> None:
    """``--links ports``: a rank's transfers share its port, so the same sequence takes longer than with
    every transfer at ``link_gbps`` in parallel (``--links pair``, the default)."""
    runs = {
        links: _simulate(model, tmp_path / f"{links}.json", "--compare", "sync", "--links", links)
        for links in ("pair", "ports")
    }
    pair, ports = (runs[k]["modes"]["sync"] for k in ("pair", "ports"))
    assert (pair["cluster"]["links"], ports["cluster"]["links"]) == ("pair", "ports")
    assert runs["ports"]["simulation"]["links"] == "ports"
    for slow, fast in zip(ports["results"], pair["results"], strict=True):
        assert slow["sequence"] == fast["sequence"] and slow["failed"] == fast["failed"] == 0
        assert slow["ttft_ms"]["mean"] > fast["ttft_ms"]["mean"]


def test_help_documents_the_link_model(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    assert "--links" in capsys.readouterr().out


def test_a_faster_port_and_the_per_rank_planner_run_the_same_sequence(model: Path, tmp_path: Path) -> None:
    """``--port-gbps`` overrides the profile's port (a faster one shortens TTFT on the same sequence);
    ``--sync-planner per-rank`` runs the same sequence and is recorded."""
    base = _simulate(model, tmp_path / "base.json", "--compare", "sync", "--links", "ports")
    fast = _simulate(
        model, tmp_path / "fast.json", "--compare", "sync", "--links", "ports", "--port-gbps", "500"
    )
    per_rank = _simulate(
        model,
        tmp_path / "per_rank.json",
        "--compare",
        "sync",
        "--links",
        "ports",
        "--sync-planner",
        "per-rank",
    )
    assert fast["simulation"]["port_gbps"] == 500 and per_rank["simulation"]["sync_planner"] == "per-rank"
    runs = (base, fast, per_rank)
    for slow, quick, own in zip(*(run["modes"]["sync"]["results"] for run in runs), strict=True):
        assert slow["sequence"] == quick["sequence"] == own["sequence"]
        assert slow["failed"] == quick["failed"] == own["failed"] == 0
        assert quick["ttft_ms"]["mean"] < slow["ttft_ms"]["mean"]


def test_route_skew_reaches_the_simulated_ranks(model: Path, tmp_path: Path) -> None:
    """Skewed routing loads some expert ranks more than others: a sync step waits for the busiest, so
    the same sequence takes longer than with uniform routing; the document records the skew."""
    uniform = _simulate(model, tmp_path / "u.json", "--compare", "sync")
    skewed = _simulate(model, tmp_path / "s.json", "--compare", "sync", "--route-skew", "1.5")
    assert skewed["config"]["cluster"]["route_skew"] == 1.5
    assert "route_skew" not in uniform["config"]["cluster"]
    for a, b in zip(uniform["modes"]["sync"]["results"], skewed["modes"]["sync"]["results"], strict=True):
        assert a["sequence"] == b["sequence"]
        assert b["ttft_ms"]["mean"] > a["ttft_ms"]["mean"]


def test_a_negative_route_skew_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--route-skew", "-0.5"])
    assert exit_info.value.code == 2
    assert "--route-skew" in capsys.readouterr().err


def test_max_batch_tokens_reaches_the_scheduler(model: Path, tmp_path: Path) -> None:
    """``--max-batch-tokens`` (as ``asap bench --compare`` takes it) bounds the scheduler's batches: with a
    bound below most prompts, each runs alone, so the same sequence takes more batches (more events). At a
    rate where prompts queue, so that batches would merge them."""
    load = ("--compare", "async", "--sweep", "400")
    default = _simulate(model, tmp_path / "d.json", *load)
    small = _simulate(model, tmp_path / "s.json", *load, "--max-batch-tokens", "32")
    assert small["config"]["cluster"]["max_batch_tokens"] == 32
    assert "max_batch_tokens" not in default["config"]["cluster"]
    for a, b in zip(default["modes"]["async"]["results"], small["modes"]["async"]["results"], strict=True):
        assert a["sequence"] == b["sequence"] and a["failed"] == b["failed"] == 0
    runs = default["simulation"]["runs"]["async"], small["simulation"]["runs"]["async"]
    assert runs[1]["events"] > runs[0]["events"]
