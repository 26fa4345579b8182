"""Read the service commands out of docker/compose*.yaml and docker/k8s, as the runtime would see them.

compose: `${VAR}` / `${VAR:-default}` / `${VAR-default}` / `$$` interpolated from docker/.env, override
files merged service by service (their `command` replaces the base one). k8s: container args with
`$(VAR)` expanded from the ConfigMap (envFrom) and `env` entries, including the pod-index and pod-name
downward API fields, once per StatefulSet replica.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_COMPOSE_VAR = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?-|:?\?)(?P<arg>[^}]*))?\})")
_K8S_VAR = re.compile(r"\$\((\w+)\)")


@dataclass(frozen=True)
class ServiceArgv:
    """One process of a deployment: its `asap ...` argv and the host names other services dial it by."""

    name: str
    argv: tuple[str, ...]
    hosts: frozenset[str] = field(default_factory=frozenset)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if name is None:
            return "$"
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is None and op in ("-", ":-"):
            return arg or ""
        if value is None and op in ("?", ":?"):
            raise KeyError(f"required variable {name} is unset: {arg}")
        return value or ""

    return _COMPOSE_VAR.sub(replace, text)


def compose_services(files: Sequence[Path], env_file: Path) -> dict[str, dict[str, Any]]:
    """The merged `services:` mapping of compose ``files``, interpolated with ``env_file``."""
    env = read_env_file(env_file)
    merged: dict[str, dict[str, Any]] = {}
    for path in files:
        doc = yaml.safe_load(interpolate(path.read_text(), env))
        for name, service in (doc.get("services") or {}).items():
            merged.setdefault(name, {}).update(service)
    return merged


def compose_argvs(services: Mapping[str, Mapping[str, Any]]) -> list[ServiceArgv]:
    """Every `serve` command of a compose project; each service is reachable by its name."""
    return [
        ServiceArgv(name, tuple(str(a) for a in service["command"]), frozenset({name}))
        for name, service in services.items()
        if service.get("command") and str(service["command"][0]) == "serve"
    ]


def load_yaml_docs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def kustomization_resources(directory: Path) -> list[Path]:
    """The plain manifest files a kustomization without generators lists (base layers only)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return [directory / resource for resource in kustomization["resources"]]


def _expand(text: str, env: Mapping[str, str]) -> str:
    """`$(VAR)` -> its value; an undefined one stays as written, as Kubernetes leaves it."""
    return _K8S_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def _container_env(container: Mapping[str, Any], configmaps: Mapping[str, Mapping[str, str]],
                   pod_name: str, ordinal: int | None) -> dict[str, str]:  # fmt: skip
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = _expand(entry["value"], env)
            continue
        ref = entry["valueFrom"]
        if "configMapKeyRef" in ref:
            env[entry["name"]] = configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
            continue
        path = ref["fieldRef"]["fieldPath"]
        if path == "metadata.labels['apps.kubernetes.io/pod-index']" and ordinal is not None:
            env[entry["name"]] = str(ordinal)
        elif path == "metadata.name":
            env[entry["name"]] = pod_name
        else:
            raise ValueError(f"{pod_name}: env {entry['name']} uses an unsupported field {path!r}")
    return env


def k8s_argvs(docs: Sequence[Mapping[str, Any]]) -> list[ServiceArgv]:
    """One ServiceArgv per pod (StatefulSet replica or Deployment), args expanded as the kubelet does."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    services = [d for d in docs if d["kind"] == "Service"]
    argvs = []
    for workload in docs:
        if workload["kind"] not in ("StatefulSet", "Deployment"):
            continue
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]
        labels = pod["metadata"]["labels"]
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "asap"]
        pods: list[tuple[str, int | None, set[str]]]
        if workload["kind"] == "StatefulSet":
            headless = workload["spec"]["serviceName"]
            pods = [
                (f"{name}-{i}", i, {f"{name}-{i}.{headless}"}) for i in range(workload["spec"]["replicas"])
            ]
        else:
            names = {
                s["metadata"]["name"] for s in services if _selects(s["spec"].get("selector", {}), labels)
            }
            pods = [(f"{name}-pod", None, names)]
        for pod_name, ordinal, hosts in pods:
            env = _container_env(container, configmaps, pod_name, ordinal)
            argv = tuple(_expand(str(arg), env) for arg in container["args"])
            argvs.append(ServiceArgv(pod_name, argv, frozenset(hosts)))
    return argvs


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
