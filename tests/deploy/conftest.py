"""Deployment files and the validators that check them.

The validators (docker-compose, hadolint, kubernetes-validate, kubectl for kustomize) are not Python
dependencies of the project: `make validate-deploy` installs pinned versions and runs these tests with
ASAP_DEPLOY_STRICT=1, where a missing tool is a failure. Elsewhere a test needing a missing tool skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
STRICT_ENV = "ASAP_DEPLOY_STRICT"


def find_tool(name: str) -> str | None:
    """``name`` from this interpreter's bin directory (the venv `make validate-deploy` fills), else PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """``tool(name)`` -> its path; skips (fails under ASAP_DEPLOY_STRICT=1) when it is not installed."""

    def lookup(name: str) -> str:
        path = find_tool(name)
        if path is None:
            message = f"{name} is not installed (`make validate-deploy` installs the deploy validators)"
            if os.environ.get(STRICT_ENV) == "1":
                pytest.fail(message)
            pytest.skip(message)
        return path

    return lookup


def run(argv: Sequence[str], cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a validator; its output is kept for assertion messages."""
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
