"""docker/Dockerfile and docker/Dockerfile.cuda: hadolint-clean under docker/.hadolint.yaml, and the
final stage is the small non-root runtime the issue asks for."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER, REPO, output, run

DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]


def hadolint(tool: Callable[[str], str], path: Path) -> list[str]:
    return [tool("hadolint"), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(path)]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(tool: Callable[[str], str], path: Path) -> None:
    result = run(hadolint(tool, path))
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            "ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm",
            "ARG PYTHON_IMAGE=python:latest\nFROM python:latest AS x",
        ),
        ("WORKDIR /src", "RUN cd /src"),
    ],
)
def test_hadolint_rejects_a_broken_copy(
    tool: Callable[[str], str], tmp_path: Path, old: str, new: str
) -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert old in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new, 1))
    result = run(hadolint(tool, broken))
    assert result.returncode != 0, output(result)


def final_stage(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    start = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[start:]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_a_small_non_root_runtime(path: Path) -> None:
    stage = final_stage(path)
    text = "\n".join(stage)
    assert "COPY --from=build /opt/asap /opt/asap" in text
    for forbidden in ("pip install", "gcc", "build-essential", "pytest", "[dev]", "python3.11-venv"):
        assert forbidden not in text, f"{path.name}'s runtime stage has {forbidden!r}"
    (user,) = [line for line in stage if line.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") for line in stage)
    assert 'CMD ["python", "-m", "asap.tools.healthcheck"]' in text
    assert 'ENTRYPOINT ["asap"]' in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path: Path) -> None:
    images = [
        line.split("=", 1)[1]
        for line in path.read_text().splitlines()
        if line.startswith("ARG ") and "_IMAGE=" in line
    ]
    assert images, "base image comes from an ARG"
    for image in images:
        tag = image.rsplit(":", 1)[1]
        assert tag != "latest" and any(c.isdigit() for c in tag), image


@pytest.mark.parametrize(
    ("path", "choice"),
    [
        (DOCKER / "Dockerfile", '1) project=".[nixl]" ;;'),
        (DOCKER / "Dockerfile.cuda", '1) nixl="nixl-cu12" ;;'),
    ],
    ids=["Dockerfile", "Dockerfile.cuda"],
)
def test_nixl_is_an_opt_in_build_arg(path: Path, choice: str) -> None:
    text = path.read_text()
    assert "ARG WITH_NIXL=0\n" in text  # off unless asked for
    assert choice in text
    assert not any("WITH_NIXL" in line for line in final_stage(path))  # a build-stage choice only


def test_the_nixl_packages_the_images_install_are_pinned() -> None:
    pins = {
        line.split("==")[0]
        for line in (REPO / "constraints" / "ci.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (nixl,) = extras["nixl"]
    assert nixl.split(">=")[0] in pins  # the CPU image's asap-serve[nixl]
    assert "nixl-cu12" in pins  # the CUDA image's
