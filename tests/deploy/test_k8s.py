"""docker/k8s: every manifest valid against the Kubernetes schemas (oldest supported and current), base and
GPU overlay, rank wiring consistent, and the same cluster `asap up` starts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from asap.cluster import ClusterSpec
from tests.deploy.conftest import K8S, output, run
from tests.deploy.deployments import k8s_argvs, kustomization_resources, load_yaml_docs
from tests.deploy.topology import asap_up_topology, topology

# 1.28: the oldest Kubernetes the manifests support (pod-index label); 1.37: the newest schema bundled.
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
HTTP_PORT = 8000  # the scheduler's OpenAI HTTP API (--http-port)


def render(tool: Callable[[str], str], overlay: str, tmp_path: Path) -> Path:
    result = run([tool("kubectl"), "kustomize", str(K8S / overlay)])
    assert result.returncode == 0, output(result)
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(result.stdout)
    return rendered


def validate(tool: Callable[[str], str], path: Path, version: str) -> tuple[bool, str]:
    """kubernetes-validate, strict (unknown fields fail); a kind it has no schema for fails too."""
    result = run([tool("kubernetes-validate"), "--strict", "-k", version, "--quiet", str(path)])
    text = output(result)
    return result.returncode == 0 and "Couldn't find schema" not in text, text


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_manifests_are_valid(tool: Callable[[str], str], tmp_path: Path, overlay: str, version: str) -> None:
    ok, text = validate(tool, render(tool, overlay, tmp_path), version)
    assert ok, text


def test_every_manifest_file_is_valid_on_its_own(tool: Callable[[str], str]) -> None:
    for path in kustomization_resources(K8S / "base"):
        ok, text = validate(tool, path, KUBERNETES_VERSIONS[-1])
        assert ok, text


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("containerPort: 50071", "containerPort: grpc"),  # wrong type
        ("  podManagementPolicy: Parallel", "  podManagmentPolicy: Parallel"),  # unknown field (typo)
        ("kind: StatefulSet", "kind: StatefulSett"),  # unknown kind
    ],
)
def test_validation_rejects_a_broken_copy(
    tool: Callable[[str], str], tmp_path: Path, old: str, new: str
) -> None:
    text = (K8S / "base" / "expert.yaml").read_text()
    assert old in text
    broken = tmp_path / "expert.yaml"
    broken.write_text(text.replace(old, new, 1))
    ok, output_text = validate(tool, broken, KUBERNETES_VERSIONS[-1])
    assert not ok, output_text


def base_docs() -> list[dict[str, Any]]:
    return load_yaml_docs(kustomization_resources(K8S / "base"))


def cluster_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    data: dict[str, str] = configmap["data"]
    return data


def test_base_runs_what_asap_up_runs() -> None:
    docs = base_docs()
    env = cluster_env(docs)
    spec = ClusterSpec(
        attention=2, experts=2, mode=env["ASAP_MODE"], dtype=env["ASAP_DTYPE"], device=env["ASAP_DEVICE"],
        http_port=HTTP_PORT,
    )  # fmt: skip
    assert topology(k8s_argvs(docs)) == asap_up_topology(spec, env["ASAP_MODEL"])


def test_gpu_overlay_runs_what_asap_up_runs(tool: Callable[[str], str], tmp_path: Path) -> None:
    docs = load_yaml_docs([render(tool, "gpu", tmp_path)])
    spec = ClusterSpec(
        attention=2, experts=2, mode="async", dtype="bfloat16", device="cuda", http_port=HTTP_PORT
    )
    assert topology(k8s_argvs(docs)) == asap_up_topology(spec, "tiny")
    for workload in (d for d in docs if d["kind"] == "StatefulSet"):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"].endswith("-cuda")


@pytest.mark.parametrize("replicas", [1, 3])
def test_topology_check_catches_a_replica_count_the_configmap_does_not_list(replicas: int) -> None:
    docs = base_docs()
    (experts,) = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "expert"]
    experts["spec"]["replicas"] = replicas
    with pytest.raises(ValueError, match="expert"):
        topology(k8s_argvs(docs))


def test_ranks_have_stable_names_and_grpc_probes() -> None:
    docs = base_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for workload in (d for d in docs if d["kind"] in ("StatefulSet", "Deployment")):
        pod = workload["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        port = container["ports"][0]["containerPort"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{workload['metadata']['name']} {probe}"
        if workload["kind"] == "StatefulSet":
            headless = services[workload["spec"]["serviceName"]]
            assert headless["spec"]["clusterIP"] == "None"
            assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            assert workload["spec"]["podManagementPolicy"] == "Parallel"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_manifests_name_no_namespace() -> None:
    for doc in base_docs():
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
    assert "namespace" not in yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())


def test_pods_drain_within_their_termination_grace_period() -> None:
    from attention_svc.config import AttentionServiceConfig
    from expert_svc.config import ExpertServiceConfig
    from scheduler_svc.server import SchedulerServiceConfig

    # What SIGTERM may take in each service: the drain of the work in flight, then as long again as the
    # grace of the RPCs still open (asap.rpc.server.serve_until_signalled).
    drain_s = {
        "scheduler": SchedulerServiceConfig(attention_targets=["a:1"]).drain_timeout_s,
        "attention": AttentionServiceConfig(expert_targets=["e:1"]).drain_timeout_s,
        "expert": ExpertServiceConfig().drain_timeout_s,
    }
    for workload in (d for d in base_docs() if d["kind"] in ("StatefulSet", "Deployment")):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", name
        pre_stop_s = float(command[1])
        assert pre_stop_s >= 1, f"{name}: endpoints need a moment to drop the pod before SIGTERM"
        assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + 2 * drain_s[name], name


def test_the_scheduler_service_exposes_the_openai_http_port() -> None:
    docs = base_docs()
    (scheduler,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "scheduler"]
    (container,) = scheduler["spec"]["template"]["spec"]["containers"]
    args = [str(a) for a in container["args"]]
    assert int(args[args.index("--http-port") + 1]) == HTTP_PORT
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == HTTP_PORT
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "scheduler"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"] == {"name": "http", "port": HTTP_PORT, "targetPort": "http"}
    assert ports["grpc"]["port"] == 50051  # the gRPC endpoint stays where it was
