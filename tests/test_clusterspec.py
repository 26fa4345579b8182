"""Per-rank devices of a cluster spec (plain ``cuda`` spreads ranks over the visible GPUs), and the
cluster flags ``asap bench --compare`` hands to each mode's spec and service commands."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from asap import clusterspec
from asap.bench.compare import CLUSTER_FIELDS, cluster_spec
from asap.cli import build_parser
from asap.clusterspec import (
    ClusterSpec,
    RankSpec,
    attention_commands,
    expert_commands,
    scheduler_command,
)
from asap.commands.up import spec_from_args
from asap.errors import InvalidArgument
from asap.model.resolve import model_argument


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _devices(spec: ClusterSpec) -> tuple[list[str], list[str]]:
    attention = [_flag(c.argv, "--device") for c in attention_commands(spec, "m", ["e0", "e1"])]
    experts = [_flag(c.argv, "--device") for c in expert_commands(spec, "m")]
    return attention, experts


@pytest.mark.parametrize(
    ("gpus", "attention", "experts"),
    [
        (2, ["cuda:0", "cuda:1", "cuda:0"], ["cuda:0", "cuda:1"]),
        (4, ["cuda:0", "cuda:1", "cuda:2"], ["cuda:0", "cuda:1"]),
        (1, ["cuda:0"] * 3, ["cuda:0"] * 2),
        (0, ["cuda"] * 3, ["cuda"] * 2),  # no GPU: the service fails with its own error
    ],
)
def test_plain_cuda_spreads_rank_r_over_gpu_r_mod_n(
    monkeypatch: pytest.MonkeyPatch, gpus: int, attention: list[str], experts: list[str]
) -> None:
    monkeypatch.setattr(clusterspec, "visible_gpus", lambda: gpus)
    assert _devices(ClusterSpec(attention=3, experts=2, device="cuda")) == (attention, experts)


def test_explicit_devices_win_and_other_devices_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_query() -> int:
        raise AssertionError("GPUs are counted only for a plain cuda device")

    monkeypatch.setattr(clusterspec, "visible_gpus", no_query)
    assert _devices(ClusterSpec(attention=2, experts=2, device="cpu")) == (["cpu"] * 2, ["cpu"] * 2)
    assert _devices(ClusterSpec(attention=2, experts=1, device="cuda:1")) == (["cuda:1"] * 2, ["cuda:1"])
    monkeypatch.setattr(clusterspec, "visible_gpus", lambda: 2)
    spec = ClusterSpec(
        attention=2,
        experts=2,
        device="cuda",
        attention_ranks=[RankSpec(device="cuda:1")],
        expert_ranks=[RankSpec(), RankSpec(device="cpu")],
    )
    assert _devices(spec) == (["cuda:1", "cuda:1"], ["cuda:0", "cpu"])


def test_bench_compare_passes_random_model_cuda_and_bf16_to_every_rank(
    monkeypatch: pytest.MonkeyPatch, qwen3_dir: Path, tmp_path: Path
) -> None:
    monkeypatch.setattr(clusterspec, "visible_gpus", lambda: 2)
    arch = tmp_path / "arch"
    arch.mkdir()
    shutil.copy(qwen3_dir / "config.json", arch / "config.json")
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["bench", "--compare", "async,sync", "--model", "random:arch", "--attention", "2", "--experts", "2",
         "--device", "cuda", "--dtype", "bfloat16", "--lengths", "fixed:8"]
    )  # fmt: skip
    fields = {name: getattr(args, name) for name in CLUSTER_FIELDS}
    spec = cluster_spec("sync", fields)
    assert (spec.mode, spec.model, spec.device, spec.dtype, spec.port) == (
        "sync", "random:arch", "cuda", "bfloat16", 0,
    )  # fmt: skip
    model = model_argument(spec.model)
    assert model == f"random:{arch.resolve()}"
    commands = [*expert_commands(spec, model), *attention_commands(spec, model, ["e0", "e1"])]
    assert [
        (_flag(c.argv, "--model"), _flag(c.argv, "--device"), _flag(c.argv, "--dtype")) for c in commands
    ] == [
        (model, "cuda:0", "bfloat16"),
        (model, "cuda:1", "bfloat16"),
        (model, "cuda:0", "bfloat16"),
        (model, "cuda:1", "bfloat16"),
    ]


def test_yaml_spec_reads_optimizations_and_min_batch_tokens(tmp_path: Path) -> None:
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text(
        "optimizations: none\nmin_batch_tokens: 96\nattention: {count: 1}\nexperts: {count: 1}\n"
    )
    spec = clusterspec.load_cluster_yaml(spec_file)
    assert (spec.optimizations, spec.min_batch_tokens) == ("none", 96)
    scheduler = clusterspec.scheduler_command(spec, "m", ["a0"]).argv
    assert (_flag(scheduler, "--optimizations"), _flag(scheduler, "--min-batch-tokens")) == ("none", "96")
    assert [_flag(c.argv, "--optimizations") for c in expert_commands(spec, "m")] == ["none"]


def test_yaml_optimizations_list_and_flags_override_the_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("optimizations: min-batch,dual-batch\nmin_batch_tokens: 96\n")
    from_file = clusterspec.load_cluster_yaml(spec_file)
    assert from_file.optimizations == ClusterSpec(optimizations="dual-batch,min-batch").optimizations
    overridden = clusterspec.load_cluster_yaml(spec_file, {"optimizations": "all", "min_batch_tokens": 8})
    assert (overridden.optimizations, overridden.min_batch_tokens) == ("all", 8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optimizations: warp-drive\n", "warp-drive"),
        ("min_batch_tokens: many\n", "min_batch_tokens must be an integer"),
        ("max_batch_tokens: 0\n", "max_batch_tokens must be >= 1, got 0"),
        ("optimisations: none\n", "unknown keys ['optimisations']"),
    ],
)
def test_yaml_spec_rejects_bad_values_and_misspelt_keys(tmp_path: Path, text: str, message: str) -> None:
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text(text)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        clusterspec.load_cluster_yaml(spec_file)


def test_max_batch_tokens_reaches_the_scheduler_from_bench_up_and_yaml(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "--compare", "async", "--max-batch-tokens", "16384", "--lengths", "fixed:8"]
    )
    spec = cluster_spec("async", {name: getattr(args, name) for name in CLUSTER_FIELDS})
    assert _flag(scheduler_command(spec, "m", ["a0"]).argv, "--max-batch-tokens") == "16384"
    up = build_parser().parse_args(["up", "--max-batch-tokens", "4096"])
    assert spec_from_args(up).max_batch_tokens == 4096
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("max_batch_tokens: 2048\n")
    assert clusterspec.load_cluster_yaml(spec_file).max_batch_tokens == 2048
    # unset: the scheduler's own default, no flag at all
    assert "--max-batch-tokens" not in scheduler_command(ClusterSpec(), "m", ["a0"]).argv


def test_max_inflight_reaches_the_scheduler_and_attention_ranks_from_bench_up_and_yaml(
    tmp_path: Path,
) -> None:
    def bounds(spec: ClusterSpec) -> list[str | None]:
        argvs = [scheduler_command(spec, "m", ["a0"]).argv] + [
            c.argv for c in attention_commands(spec, "m", ["e0"])
        ]
        return [_flag(a, "--max-inflight") if "--max-inflight" in a else None for a in argvs]

    args = build_parser().parse_args(
        ["bench", "--compare", "async", "--max-inflight", "3", "--lengths", "fixed:8"]
    )
    spec = cluster_spec("async", {name: getattr(args, name) for name in CLUSTER_FIELDS})
    assert bounds(spec) == ["3", "3", "3"]  # the scheduler and both attention ranks
    assert spec_from_args(build_parser().parse_args(["up", "--max-inflight", "4"])).max_inflight == 4
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("max_inflight: 1\n")
    assert clusterspec.load_cluster_yaml(spec_file).max_inflight == 1
    assert bounds(ClusterSpec()) == [None, None, None]  # unset: the services' own default
    with pytest.raises(InvalidArgument, match="max_inflight must be >= 1, got 0"):
        ClusterSpec(max_inflight=0)
    with pytest.raises(SystemExit):  # a usage error, before any cluster starts
        build_parser().parse_args(["up", "--max-inflight", "0"])


def test_a_cuda_cluster_batches_up_to_the_gpu_bound_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clusterspec, "visible_gpus", lambda: 1)

    def bound(spec: ClusterSpec) -> str | None:
        argv = scheduler_command(spec, "m", ["a0", "a1"]).argv
        return _flag(argv, "--max-batch-tokens") if "--max-batch-tokens" in argv else None

    assert bound(ClusterSpec(device="cuda")) == str(clusterspec.GPU_MAX_BATCH_TOKENS) == "16384"
    assert bound(ClusterSpec(device="cuda:0", max_batch_tokens=4096)) == "4096"
    assert bound(ClusterSpec(device="cpu")) is None  # the scheduler's own default
    # an attention rank on the CPU: not a GPU cluster
    mixed = ClusterSpec(device="cuda", attention_ranks=[RankSpec(device="cpu"), RankSpec()])
    assert bound(mixed) is None


def test_route_skew_reaches_the_attention_ranks_from_up_bench_and_yaml(tmp_path: Path) -> None:
    def skews(spec: ClusterSpec) -> list[str | None]:
        argv = [c.argv for c in attention_commands(spec, "m", ["e0"])]
        return [_flag(a, "--route-skew") if "--route-skew" in a else None for a in argv]

    emulated = ["--compute", "emulated:h200"]
    up = build_parser().parse_args(["up", *emulated, "--route-skew", "0.3"])
    assert skews(spec_from_args(up)) == ["0.3", "0.3"]
    bench = build_parser().parse_args(
        ["bench", "--compare", "async", *emulated, "--route-skew", "0.5", "--lengths", "fixed:8"]
    )
    assert (
        skews(cluster_spec("async", {name: getattr(bench, name) for name in CLUSTER_FIELDS})) == ["0.5"] * 2
    )
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("compute: emulated:h200\nroute_skew: 1\n")
    assert skews(clusterspec.load_cluster_yaml(spec_file)) == ["1.0", "1.0"]
    # uniform (the default): no flag; the experts never get one
    assert skews(ClusterSpec(compute="emulated:h200")) == [None, None]
    assert all("--route-skew" not in c.argv for c in expert_commands(spec_from_args(up), "m"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"route_skew": 0.3}, "route_skew applies to emulated compute"),
        ({"compute": "emulated:h200", "route_skew": -0.1}, "route_skew must be a finite number >= 0"),
        ({"compute": "emulated:h200", "route_skew": float("nan")}, "route_skew must be a finite number >= 0"),
    ],
)
def test_a_bad_route_skew_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        ClusterSpec(**fields)


def test_route_skew_flags_and_yaml_refuse_what_is_not_a_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["up", "--route-skew", "-1"])
    assert exit_info.value.code == 2
    assert "expected a finite number >= 0, got '-1'" in capsys.readouterr().err
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text("compute: emulated:h200\nroute_skew: high\n")
    with pytest.raises(InvalidArgument, match="route_skew must be a number, got 'high'"):
        clusterspec.load_cluster_yaml(spec_file)
