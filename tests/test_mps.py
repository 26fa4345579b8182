"""MPS for clusters whose ranks share a GPU (asap.mps), against a fake ``nvidia-cuda-mps-control`` on PATH
that records every command it gets and the pipe directory it was pointed at."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from asap import mps
from asap.cluster import LocalCluster
from asap.clusterspec import ClusterSpec, RankSpec, load_cluster_yaml
from asap.errors import InvalidArgument, Unavailable
from asap.mps import Action, ClusterMps, MpsStatus, cuda_devices_shared, decide, probe

# Like the real one: -d starts a daemon (here: creates the control pipe), commands come on stdin and fail
# with "Cannot find MPS control daemon process" where no daemon runs; quit stops it.
FAKE_CONTROL = """#!/bin/sh
pipe="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
if [ "$1" = "-d" ]; then
  echo "-d pipe=$pipe log=$CUDA_MPS_LOG_DIRECTORY" >> "$FAKE_MPS_RECORD"
  [ -n "$FAKE_MPS_FAIL_START" ] && { echo "An instance of this daemon is already running" >&2; exit 1; }
  mkdir -p "$pipe" && touch "$pipe/control"
  exit 0
fi
read -r command
echo "$command pipe=$pipe" >> "$FAKE_MPS_RECORD"
[ -e "$pipe/control" ] || { echo "Cannot find MPS control daemon process"; exit 1; }
[ "$command" = "quit" ] && rm -f "$pipe/control"
exit 0
"""


@pytest.fixture
def fake_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake control program first on PATH; returns the file its commands are recorded in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / mps.CONTROL
    script.write_text(FAKE_CONTROL)
    script.chmod(0o755)
    record = tmp_path / "record.txt"
    record.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(record))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "default-pipe"))
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)
    return record


def _commands(record: Path) -> list[str]:
    return [line.split(" ")[0] for line in record.read_text().splitlines()]


def _status(control: bool = True, serving: bool = False) -> MpsStatus:
    return MpsStatus(control="/bin/ctl" if control else None, pipe_dir="/tmp/nvidia-mps", serving=serving)


@pytest.mark.parametrize(
    ("devices", "shared"),
    [
        (["cuda:0", "cuda:1", "cuda:0", "cuda:1"], True),
        (["cuda:0", "cuda:1"], False),
        (["cuda", "cuda:0"], True),  # plain cuda is GPU 0
        (["cpu", "cpu"], False),
        (["cuda:1", "cpu", "cpu"], False),
    ],
)
def test_shared_gpu_is_two_ranks_on_one_cuda_device(devices: list[str], shared: bool) -> None:
    assert cuda_devices_shared(devices) is shared


@pytest.mark.parametrize(
    ("mode", "devices", "status", "action"),
    [
        ("auto", ["cuda:0", "cuda:0"], _status(), Action.START),
        ("auto", ["cuda:0", "cuda:0"], _status(control=False), Action.WARN),
        ("auto", ["cuda:0", "cuda:0"], _status(serving=True), Action.USE_EXISTING),
        ("auto", ["cuda:0", "cuda:1"], _status(), Action.NONE),
        ("auto", ["cpu", "cpu"], _status(), Action.NONE),
        ("on", ["cuda:0", "cuda:1"], _status(), Action.START),
        ("on", ["cuda:0", "cuda:0"], _status(serving=True), Action.USE_EXISTING),
        ("off", ["cuda:0", "cuda:0"], _status(), Action.WARN),
        ("off", ["cuda:0", "cuda:0"], _status(serving=True), Action.NONE),
        ("off", ["cuda:0", "cuda:1"], _status(), Action.NONE),
    ],
)
def test_decide(mode: str, devices: list[str], status: MpsStatus, action: Action) -> None:
    assert decide(mode, devices, status).action is action


def test_decide_on_fails_clearly_when_impossible() -> None:
    with pytest.raises(InvalidArgument, match="not on PATH"):
        decide("on", ["cuda:0", "cuda:0"], _status(control=False))
    with pytest.raises(InvalidArgument, match="needs CUDA ranks"):
        decide("on", ["cpu"], _status())
    with pytest.raises(InvalidArgument, match="mps must be one of"):
        decide("sometimes", ["cuda:0"], _status())


def test_probe_without_the_program(tmp_path: Path) -> None:
    status = probe({"PATH": str(tmp_path)})
    assert status == MpsStatus(control=None, pipe_dir=mps.DEFAULT_PIPE_DIR, serving=False)


def test_probe_asks_only_where_a_control_pipe_exists(fake_control: Path, tmp_path: Path) -> None:
    assert probe().serving is False
    assert _commands(fake_control) == []  # no control pipe: nothing asked
    pipe = tmp_path / "default-pipe"
    pipe.mkdir()
    (pipe / "control").touch()
    status = probe()
    assert status.serving is True and status.pipe_dir == str(pipe)
    assert status.control is not None and status.control.endswith(mps.CONTROL)
    assert _commands(fake_control) == ["get_server_list"]


def test_cluster_mps_starts_a_private_daemon_and_stops_it(fake_control: Path) -> None:
    session = ClusterMps("auto", ["cuda:0", "cuda:0"])
    env = session.start()
    assert session.decision is not None and session.decision.action is Action.START
    root = Path(env["CUDA_MPS_PIPE_DIRECTORY"]).parent
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    assert (root / "pipe" / "control").exists()
    session.stop()
    session.stop()  # idempotent
    assert not root.exists()
    lines = fake_control.read_text().splitlines()
    assert _commands(fake_control) == ["-d", "get_server_list", "quit"]
    # every command went to the private daemon, never to the default pipe directory
    assert all(f"pipe={root / 'pipe'}" in line for line in lines)
    assert f"log={root / 'log'}" in lines[0]


def test_cluster_mps_uses_a_serving_daemon(fake_control: Path, tmp_path: Path) -> None:
    pipe = tmp_path / "default-pipe"
    pipe.mkdir()
    (pipe / "control").touch()
    with ClusterMps("auto", ["cuda:0", "cuda:0"]) as env:
        assert env == {"CUDA_MPS_PIPE_DIRECTORY": str(pipe)}
    assert _commands(fake_control) == ["get_server_list"]  # nothing started, nothing stopped
    assert (pipe / "control").exists()


def test_cluster_mps_warns_loudly_without_the_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="asap.mps"), ClusterMps("auto", ["cuda:0", "cuda:0"]) as env:
        assert env == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "time-slice" in warnings[0].getMessage()


def test_a_daemon_that_fails_to_start_is_unavailable(
    fake_control: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MPS_FAIL_START", "1")
    session = ClusterMps("on", ["cuda:0"])
    with pytest.raises(Unavailable, match="already running"):
        session.start()
    session.stop()
    assert _commands(fake_control) == ["-d"]


def test_local_cluster_gives_cuda_ranks_mps_and_eager_module_loading(fake_control: Path) -> None:
    """The launcher's GPU preparation alone (no child is started): explicit per-rank devices, so no GPU
    needs to be visible."""
    spec = ClusterSpec(
        attention=1,
        experts=1,
        attention_ranks=[RankSpec(device="cuda:0")],
        expert_ranks=[RankSpec(device="cuda:0")],
    )
    cluster = LocalCluster(spec)
    cluster._prepare_gpus()
    env = dict(cluster._child_env)
    assert env["CUDA_MODULE_LOADING"] == "EAGER"
    assert Path(env["CUDA_MPS_PIPE_DIRECTORY"], "control").exists()
    cluster.stop()
    assert _commands(fake_control) == ["-d", "get_server_list", "quit"]
    assert not Path(env["CUDA_MPS_PIPE_DIRECTORY"]).exists()


def test_local_cluster_leaves_cpu_ranks_alone(fake_control: Path) -> None:
    cluster = LocalCluster(ClusterSpec(attention=1, experts=1))
    cluster._prepare_gpus()
    assert cluster._child_env == {}
    assert _commands(fake_control) == []


def test_local_cluster_keeps_a_module_loading_the_user_chose(
    fake_control: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_MODULE_LOADING", "LAZY")
    spec = ClusterSpec(attention=1, experts=1, mps="off", attention_ranks=[RankSpec(device="cuda:0")])
    cluster = LocalCluster(spec)
    cluster._prepare_gpus()
    assert "CUDA_MODULE_LOADING" not in cluster._child_env  # the children inherit LAZY
    cluster.stop()


def test_spec_mps_from_flags_and_yaml(tmp_path: Path) -> None:
    from asap.cli import build_parser
    from asap.commands import up

    assert ClusterSpec().mps == "auto"
    with pytest.raises(InvalidArgument, match="mps must be one of"):
        ClusterSpec(mps="maybe")
    spec_file = tmp_path / "c.yaml"
    spec_file.write_text("mps: off\n")  # YAML 1.1 reads a bare off as False
    assert load_cluster_yaml(spec_file).mps == "off"
    spec_file.write_text("mps: sometimes\n")
    with pytest.raises(InvalidArgument, match="mps must be one of"):
        load_cluster_yaml(spec_file)
    spec_file.write_text("mps: on\n")
    assert load_cluster_yaml(spec_file).mps == "on"
    args = build_parser().parse_args(["up", "--config", str(spec_file), "--mps", "on"])
    assert up.spec_from_args(args).mps == "on"
    assert up.spec_from_args(build_parser().parse_args(["up"])).mps == "auto"
