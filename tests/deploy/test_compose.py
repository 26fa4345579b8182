"""docker/compose.yaml (+ the GPU override): valid for docker-compose, and the cluster `asap up` starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from asap.cluster import ClusterSpec
from tests.deploy.conftest import DOCKER, output, run
from tests.deploy.deployments import compose_argvs, compose_services, read_env_file
from tests.deploy.topology import asap_up_topology, topology

BASE = [DOCKER / "compose.yaml"]
GPU = [DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml"]
ENV = read_env_file(DOCKER / ".env")


def up_spec(dtype: str, device: str) -> ClusterSpec:
    """What `asap up` would start for the compose cluster: 2+2 ranks, the scheduler's HTTP door on."""
    return ClusterSpec(
        attention=2, experts=2, mode=ENV["ASAP_MODE"], dtype=dtype, device=device,
        http_port=int(ENV["SCHEDULER_HTTP_PORT"]),
    )  # fmt: skip


def compose_config(tool: Callable[[str], str], files: list[Path], *extra: str) -> list[str]:
    argv = [tool("docker-compose"), "--project-directory", str(DOCKER)]
    for path in files:
        argv += ["-f", str(path)]
    return [*argv, "config", *extra]


@pytest.mark.parametrize("files", [BASE, GPU], ids=["cpu", "gpu"])
def test_compose_config_is_valid(tool: Callable[[str], str], files: list[Path]) -> None:
    result = run(compose_config(tool, files, "-q"))
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("stop_grace_period: 30s", "stop_grace_period: [30s]"),  # a type the schema rejects
        ("condition: service_healthy", "condition: service_happy"),
        ("    healthcheck:\n", "    health_check:\n"),  # an unknown key
        ("jaeger: {condition: service_started}", "jager: {condition: service_started}"),  # no such service
    ],
)
def test_compose_config_rejects_a_broken_copy(
    tool: Callable[[str], str], tmp_path: Path, old: str, new: str
) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert old in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = run(compose_config(tool, [broken], "-q"))
    assert result.returncode != 0, output(result)


@pytest.mark.parametrize(("files", "dtype", "device"), [(BASE, ENV["ASAP_DTYPE"], ENV["ASAP_DEVICE"]),
                                                       (GPU, "bfloat16", "cuda")], ids=["cpu", "gpu"])  # fmt: skip
def test_compose_runs_what_asap_up_runs(files: list[Path], dtype: str, device: str) -> None:
    argvs = compose_argvs(compose_services(files, DOCKER / ".env"))
    assert topology(argvs) == asap_up_topology(up_spec(dtype, device), ENV["ASAP_MODEL"])
    assert {a.argv[a.argv.index("--host") + 1] for a in argvs} == {
        "0.0.0.0"
    }  # reachable from other containers


def test_compose_topology_check_catches_a_wrong_expert_list(tmp_path: Path) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    swapped = "expert-1:${EXPERT_PORT:-50071},expert-0:${EXPERT_PORT:-50071}"
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        text.replace("expert-0:${EXPERT_PORT:-50071},expert-1:${EXPERT_PORT:-50071}", swapped, 1)
    )
    with pytest.raises(ValueError, match=r"lists experts \(1, 0\)"):
        topology(compose_argvs(compose_services([broken], DOCKER / ".env")))


def test_compose_topology_check_catches_an_unparsable_command(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text((DOCKER / "compose.yaml").read_text().replace('"--num-ranks"', '"--ranks-total"', 1))
    with pytest.raises(ValueError, match="rejected by asap's parser"):
        topology(compose_argvs(compose_services([broken], DOCKER / ".env")))


@pytest.mark.parametrize("files", [BASE, GPU], ids=["cpu", "gpu"])
def test_interpolation_matches_docker_compose(tool: Callable[[str], str], files: list[Path]) -> None:
    """The topology tests read compose files themselves; docker-compose must see the same commands."""
    result = run(compose_config(tool, files))
    assert result.returncode == 0, output(result)
    theirs = {name: s.get("command") for name, s in yaml.safe_load(result.stdout)["services"].items()}
    ours = {name: s.get("command") for name, s in compose_services(files, DOCKER / ".env").items()}
    assert ours == theirs


def test_services_are_wired_for_start_order_health_and_traces() -> None:
    services = compose_services(BASE, DOCKER / ".env")
    for name, service in services.items():
        assert service.get("restart"), f"{name} has no restart policy"
        if name.startswith(("expert-", "attention-", "scheduler")):
            assert service["healthcheck"]["test"][1:4] == ["python", "-m", "asap.tools.healthcheck"]
            assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    for name in ("attention-0", "attention-1"):
        assert services[name]["depends_on"] == {
            f"expert-{r}": {"condition": "service_healthy"} for r in (0, 1)
        }
    assert {"attention-0", "attention-1"} <= set(services["scheduler"]["depends_on"])
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


@pytest.mark.parametrize("files", [BASE, GPU], ids=["cpu", "gpu"])
def test_scheduler_publishes_its_openai_http_port(files: list[Path]) -> None:
    scheduler = compose_services(files, DOCKER / ".env")["scheduler"]
    command = scheduler["command"]
    port = int(command[command.index("--http-port") + 1])
    assert port == int(ENV["SCHEDULER_HTTP_PORT"]) > 0  # fixed: the port mapping names it
    assert f"{ENV['SCHEDULER_HTTP_PUBLISHED_PORT']}:{port}" in scheduler["ports"]
    assert f"{ENV['SCHEDULER_PUBLISHED_PORT']}:{ENV['SCHEDULER_PORT']}" in scheduler["ports"]


def test_docker_compose_publishes_the_http_port(tool: Callable[[str], str]) -> None:
    """docker-compose's own reading of the port mapping (the test above reads the file itself)."""
    result = run(compose_config(tool, BASE))
    assert result.returncode == 0, output(result)
    ports = yaml.safe_load(result.stdout)["services"]["scheduler"]["ports"]
    published = {(int(p["published"]), int(p["target"])) for p in ports}
    http = int(ENV["SCHEDULER_HTTP_PORT"])
    assert (int(ENV["SCHEDULER_HTTP_PUBLISHED_PORT"]), http) in published


def test_compose_topology_check_catches_a_scheduler_without_its_http_port(tmp_path: Path) -> None:
    text = (DOCKER / "compose.yaml").read_text()
    flag = ',\n              "--http-port", "${SCHEDULER_HTTP_PORT:-8000}"'
    assert flag in text
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace(flag, "", 1))
    ours = topology(compose_argvs(compose_services([broken], DOCKER / ".env")))
    assert ours != asap_up_topology(up_spec(ENV["ASAP_DTYPE"], ENV["ASAP_DEVICE"]), ENV["ASAP_MODEL"])
