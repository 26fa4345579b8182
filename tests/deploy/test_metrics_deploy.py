"""Metrics in the deployments: every service serves /metrics on the port its manifests expose and
annotate, the ServiceMonitor and the compose Prometheus find every service, and the Grafana dashboard
queries only metrics the services export (the README's table)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DOCKER, K8S, REPO, output, run
from tests.deploy.deployments import (
    compose_argvs,
    compose_services,
    kustomization_resources,
    load_yaml_docs,
    read_env_file,
)
from tests.deploy.test_compose import BASE, GPU, compose_config

ENV = read_env_file(DOCKER / ".env")
DASHBOARD = DOCKER / "grafana" / "asap-dashboard.json"


def metrics_port_of(argv: tuple[str, ...] | list[str]) -> int:
    return int(argv[list(argv).index("--metrics-port") + 1])


def readme_metrics() -> set[str]:
    """The metric names in the README's metrics table (first column, backquoted)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(asap_\w+)`", section, flags=re.MULTILINE))


def base_docs() -> list[dict[str, Any]]:
    return load_yaml_docs(kustomization_resources(K8S / "base"))


def test_every_k8s_pod_serves_metrics_where_it_is_annotated_and_exposed() -> None:
    docs = base_docs()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]
    assert {w["metadata"]["name"] for w in workloads} == {"scheduler", "attention", "expert"}
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        port = metrics_port_of(container["args"])
        assert port > 0, name  # a fixed port: scrape configs name it
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port, name
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port)
        assert annotations["prometheus.io/path"] == "/metrics"
        service_ports = {p["name"]: p for p in services[name]["spec"]["ports"]}
        assert service_ports["metrics"]["targetPort"] == "metrics", name


def test_the_service_monitor_selects_every_asap_service_on_its_metrics_port() -> None:
    docs = base_docs()
    (monitor,) = load_yaml_docs(kustomization_resources(K8S / "monitoring"))
    assert monitor["kind"] == "ServiceMonitor" and monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert "namespace" not in monitor["metadata"]
    selector = monitor["spec"]["selector"]
    (components,) = selector["matchExpressions"]
    selected = [
        d
        for d in docs
        if d["kind"] == "Service"
        and selector["matchLabels"].items() <= d["metadata"]["labels"].items()
        and d["metadata"]["labels"].get(components["key"]) in components["values"]
    ]
    assert {d["metadata"]["name"] for d in selected} == {"scheduler", "attention", "expert"}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in selected:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_the_monitoring_kustomization_renders(tool: Callable[[str], str]) -> None:
    result = run([tool("kubectl"), "kustomize", str(K8S / "monitoring")])
    assert result.returncode == 0, output(result)
    (doc,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert doc["kind"] == "ServiceMonitor"


@pytest.mark.parametrize("files", [BASE, GPU], ids=["cpu", "gpu"])
def test_every_compose_service_serves_metrics_on_the_port_prometheus_scrapes(files: list[Path]) -> None:
    argvs = compose_argvs(compose_services(files, DOCKER / ".env"))
    ports = {a.name: metrics_port_of(a.argv) for a in argvs}
    assert set(ports.values()) == {int(ENV["METRICS_PORT"])}
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{port}" for name, port in ports.items()}


def test_monitoring_is_an_opt_in_profile_with_its_files_in_the_repository() -> None:
    services = compose_services(BASE, DOCKER / ".env")
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (DOCKER / source).exists(), f"{name} mounts {source}, which does not exist"
    assert all("profiles" not in s for n, s in services.items() if n not in ("prometheus", "grafana"))


def test_compose_with_the_monitoring_profile_is_valid(tool: Callable[[str], str]) -> None:
    result = run(compose_config(tool, BASE, "-q"))
    assert result.returncode == 0, output(result)
    argv = compose_config(tool, BASE)
    result = run([*argv[:-1], "--profile", "monitoring", "config", "--services"])
    assert result.returncode == 0, output(result)
    assert {"prometheus", "grafana", "scheduler"} <= set(result.stdout.split())


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_the_dashboard_queries_only_documented_metrics() -> None:
    documented = readme_metrics()
    assert documented, "the README has no metrics table"
    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for expr in dashboard_exprs()
        for name in re.findall(r"\b(asap_\w+)", expr)
    }
    assert used and used <= documented, used - documented


def test_the_dashboard_shows_ttft_percentiles_goodput_and_per_rank_busy() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    assert "TTFT percentiles" in titles and "Goodput" in titles and "busy" in titles
    exprs = dashboard_exprs()
    assert any(
        "histogram_quantile(0.99, sum by (le) (rate(asap_time_to_first_token_seconds_bucket" in e
        for e in exprs
    )
    assert any('asap_time_to_first_token_seconds_bucket{le="$slo"}' in e for e in exprs)
    assert any("rate(asap_attention_busy_seconds_total" in e for e in exprs)
    assert any("rate(asap_expert_busy_seconds_total" in e for e in exprs)
    (slo,) = [v for v in dashboard["templating"]["list"] if v["name"] == "slo"]
    # Goodput reads a TTFT bucket: each SLO choice must be one of its bounds, as the exporter spells it.
    from asap.metrics import PREFILL_BUCKETS_S

    bounds = {repr(float(b)) for b in PREFILL_BUCKETS_S}
    assert {o["value"] for o in slo["options"]} <= bounds
