"""MPS detection on a real GPU host: what ``probe`` finds, and a private daemon that serves a CUDA client
and is gone after ``stop``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from asap.mps import CONTROL, Action, ClusterMps, control_command, probe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_probe_finds_the_control_program() -> None:
    status = probe()
    assert status.control == shutil.which(CONTROL)
    assert status.pipe_dir == os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")


def test_a_private_daemon_serves_a_cuda_client_and_quits() -> None:
    control = shutil.which(CONTROL)
    if control is None:
        pytest.skip(f"{CONTROL} is not installed here")
    host = probe()
    session = ClusterMps("on", ["cuda:0", "cuda:0"])
    env = session.start()
    try:
        assert session.decision is not None
        if host.serving:  # this host runs a daemon already: it is used, nothing is started
            assert session.decision.action is Action.USE_EXISTING and session.daemon is None
            return
        assert session.decision.action is Action.START
        child_env = {**os.environ, **env}
        assert probe(child_env).serving
        subprocess.run(
            [sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()"],
            env=child_env,
            check=True,
            timeout=120,
        )
        servers = control_command(control, "get_server_list", child_env).stdout.split()
        assert servers and all(pid.isdigit() for pid in servers)  # the client was served through MPS
    finally:
        session.stop()
    assert not probe({**os.environ, **env}).serving
    assert not os.path.exists(env["CUDA_MPS_PIPE_DIRECTORY"])
