"""TLS in the deployments: docker/compose.tls.yaml and docker/k8s/tls (plus the cert-manager example)
valid, running the same cluster as without TLS, every service reading a cert-manager-style directory
through ASAP_TLS_DIR, probes that present the service's certificate, and certificates naming every host
the services dial."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from asap.certs import service_names
from asap.rpc.tls import TlsConfig
from asap.tools.healthcheck import tls_from_command
from tests.deploy.conftest import DOCKER, K8S, output, run
from tests.deploy.deployments import ServiceArgv, compose_argvs, compose_services, k8s_argvs, load_yaml_docs
from tests.deploy.test_compose import compose_config
from tests.deploy.test_k8s import KUBERNETES_VERSIONS, base_docs, render, validate
from tests.deploy.topology import topology

MOUNT = "/etc/asap/tls"
MOUNTED = TlsConfig(ca=f"{MOUNT}/ca.crt", cert=f"{MOUNT}/tls.crt", key=f"{MOUNT}/tls.key")
TLS_COMPOSE = [DOCKER / "compose.yaml", DOCKER / "compose.tls.yaml"]
CERT_MANAGER = K8S / "tls" / "certificates.cert-manager.yaml"


def kind_of(name: str) -> str:
    return name.split("-")[0]


def covered(host: str, names: Iterable[str]) -> bool:
    """Whether a certificate naming ``names`` is valid for ``host`` (a wildcard covers one label)."""
    return any(
        host == name or (name.startswith("*.") and "." in host and fnmatch.fnmatchcase(host, name) and
                         host.count(".") == name.count("."))
        for name in names
    )  # fmt: skip


def dialled_hosts(argvs: list[ServiceArgv]) -> dict[str, set[str]]:
    """Service kind -> the host names other services dial it by (what its certificate must name)."""
    hosts: dict[str, set[str]] = {}
    for service in argvs:
        kind = service.argv[1]
        hosts.setdefault(kind, set()).update(service.hosts)
    return hosts


# --- docker compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_tls_services(tool: Callable[[str], str]) -> dict[str, Any]:
    """The services as docker-compose merges compose.yaml and compose.tls.yaml (it validates them too)."""
    result = run(compose_config(tool, TLS_COMPOSE))
    assert result.returncode == 0, output(result)
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


def _volume(entry: str | dict[str, Any]) -> tuple[str, str, bool]:
    """(source, target, read-only) of a volume in either form docker-compose prints."""
    if isinstance(entry, dict):
        return str(entry.get("source")), str(entry["target"]), bool(entry.get("read_only"))
    source, target, *mode = entry.split(":")
    return source, target, "ro" in mode


def test_compose_tls_runs_the_same_cluster(compose_tls_services: dict[str, Any]) -> None:
    plain = compose_services([DOCKER / "compose.yaml"], DOCKER / ".env")
    assert topology(compose_argvs(compose_tls_services)) == topology(compose_argvs(plain))


def test_compose_tls_mounts_each_services_directory(compose_tls_services: dict[str, Any]) -> None:
    argvs = compose_argvs(compose_tls_services)
    assert {a.name for a in argvs} == {"expert-0", "expert-1", "attention-0", "attention-1", "scheduler"}
    for service in argvs:
        config = compose_tls_services[service.name]
        assert config["environment"]["ASAP_TLS_DIR"] == MOUNT
        ((source, _, read_only),) = [v for v in map(_volume, config["volumes"]) if v[1] == MOUNT]
        assert read_only
        assert Path(source).parts[-2:] == ("tls", kind_of(service.name))
        # What the service and its health check make of it.
        assert tls_from_command(service.argv, {"ASAP_TLS_DIR": MOUNT}) == MOUNTED


def test_generated_certificates_name_every_compose_host(compose_tls_services: dict[str, Any]) -> None:
    for kind, hosts in dialled_hosts(compose_argvs(compose_tls_services)).items():
        names = service_names(kind)
        assert all(covered(host, names) for host in hosts), (kind, hosts)
        assert covered("localhost", names) and "127.0.0.1" in names  # the health check


# --- Kubernetes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_k8s_tls_overlay_is_valid(tool: Callable[[str], str], tmp_path: Path, version: str) -> None:
    ok, text = validate(tool, render(tool, "tls", tmp_path), version)
    assert ok, text


def tls_docs(tool: Callable[[str], str], tmp_path: Path) -> list[dict[str, Any]]:
    return load_yaml_docs([render(tool, "tls", tmp_path)])


def test_k8s_tls_overlay_runs_the_same_cluster(tool: Callable[[str], str], tmp_path: Path) -> None:
    assert topology(k8s_argvs(tls_docs(tool, tmp_path))) == topology(k8s_argvs(base_docs()))


def test_k8s_tls_pods_mount_their_secret_and_probe_with_it(
    tool: Callable[[str], str], tmp_path: Path
) -> None:
    docs = tls_docs(tool, tmp_path)
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert {w["metadata"]["name"] for w in workloads} == {"scheduler", "attention", "expert"}
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ASAP_TLS_DIR"] == MOUNT, name
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == MOUNT]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == f"asap-{name}-tls"
        port = container["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe], f"{name} {probe}: kubelet grpc probes send no certificate"
            assert container[probe]["exec"]["command"] == [
                "python", "-m", "asap.tools.healthcheck", f"127.0.0.1:{port}",
            ]  # fmt: skip
        argv = next(a for a in k8s_argvs(docs) if a.argv[1] == name).argv
        assert tls_from_command(argv, {"ASAP_TLS_DIR": MOUNT}) == MOUNTED


def test_cert_manager_certificates_fit_the_overlay_and_the_hosts(
    tool: Callable[[str], str], tmp_path: Path
) -> None:
    certificates = {
        d["metadata"]["name"]: d["spec"] for d in load_yaml_docs([CERT_MANAGER]) if d["kind"] == "Certificate"
    }
    hosts = dialled_hosts(k8s_argvs(tls_docs(tool, tmp_path)))
    for kind in ("scheduler", "attention", "expert"):
        spec = certificates[f"asap-{kind}-tls"]
        assert spec["secretName"] == f"asap-{kind}-tls"
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"]["name"] == "asap-ca"
        assert all(covered(host, spec["dnsNames"]) for host in hosts[kind]), (kind, hosts[kind])
        assert "127.0.0.1" in spec["ipAddresses"]  # the probes dial loopback
        # asap.certs (python -m asap.certs DIR, then kubectl create secret) names the same hosts.
        assert all(covered(host, service_names(kind)) for host in hosts[kind])
    assert "client auth" in certificates["asap-client-tls"]["usages"]
    assert certificates["asap-ca"]["isCA"] is True


def test_wildcard_matching_is_one_label() -> None:
    assert covered("expert-1.expert", ["*.expert"])
    assert not covered("a.b.expert", ["*.expert"]) and not covered("expert", ["*.expert"])
    assert not covered("expert-1.attention", ["*.expert"])
