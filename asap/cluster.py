"""A local cluster: scheduler + N attention ranks + M expert ranks as child processes of one command.

Start order follows the data flow: expert ranks first (attention ranks ask them what they host at
start-up), then attention ranks, then the scheduler. Each child prints ``serving ... at HOST:PORT`` once it
reports SERVING; the launcher then confirms with a grpc health check. Internal ranks bind port 0 unless the
spec pins a port. Child logs are forwarded line by line with a ``[service]`` prefix. If a child exits
during start-up, the launcher stops the others and raises with that child's last lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from asap.errors import InvalidArgument, Unavailable
from asap.optimizations import format_optimizations, parse_optimizations

if TYPE_CHECKING:
    from asap.telemetry.collector import CollectorHandle

logger = logging.getLogger(__name__)

READY_LINE = re.compile(r"^serving (?P<what>.+) at (?P<address>\S+)$")
MODES = ("async", "sync", "sync-chunked")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(slots=True)
class RankSpec:
    """Per-rank overrides from a cluster spec (None = cluster default)."""

    port: int = 0
    device: str | None = None
    dtype: str | None = None
    extra_args: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ClusterSpec:
    """What ``asap up`` starts. Built from flags, a YAML file, or both (flags win)."""

    model: str = "tiny"
    attention: int = 2
    experts: int = 2
    mode: str = "async"
    dtype: str = "float32"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 50051
    """The scheduler's port (the cluster's public address)."""
    compute: str = "torch"
    """``torch`` or ``emulated:DEVICE`` for every attention and expert rank."""
    optimizations: str = "all"
    """``all``, ``none`` or a comma list of min-batch, dual-batch, expert-overlap, layer-agnostic."""
    min_batch_tokens: int | None = None
    """min-batch threshold; None: the expert knee, calibrated on this backend (cached per backend)."""
    threads: int | None = None
    """torch threads per rank; default: this machine's cores split evenly over the ranks (CPU only)."""
    trace: str | None = None
    """Trace every service into this JSON-lines file through an in-process OTLP collector."""
    scheduler_args: list[str] = field(default_factory=list)
    attention_ranks: list[RankSpec] = field(default_factory=list)
    expert_ranks: list[RankSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.attention < 1 or self.experts < 1:
            raise InvalidArgument(
                f"need >= 1 attention and expert rank, got {self.attention} and {self.experts}"
            )
        if self.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if len(self.attention_ranks) > self.attention or len(self.expert_ranks) > self.experts:
            raise InvalidArgument("the spec lists more per-rank entries than ranks")
        self.attention_ranks += [RankSpec() for _ in range(self.attention - len(self.attention_ranks))]
        self.expert_ranks += [RankSpec() for _ in range(self.experts - len(self.expert_ranks))]
        self.optimizations = format_optimizations(parse_optimizations(self.optimizations))
        if self.threads is not None and self.threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {self.threads}")

    def rank_threads(self) -> int:
        """torch intra-op threads of each rank: oversubscribed OpenMP threads stall every rank on CPU."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // (self.attention + self.experts))


def _rank_specs(raw: Any, where: str) -> list[RankSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument(f"{where}.ranks must be a list")
    specs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{where}.ranks[{i}] must be a mapping")
        unknown = set(entry) - {"port", "device", "dtype", "args"}
        if unknown:
            raise InvalidArgument(f"{where}.ranks[{i}]: unknown keys {sorted(unknown)}")
        specs.append(
            RankSpec(
                port=int(entry.get("port", 0)),
                device=entry.get("device"),
                dtype=entry.get("dtype"),
                extra_args=[str(a) for a in entry.get("args", [])],
            )
        )
    return specs


def load_cluster_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> ClusterSpec:
    """Read a YAML cluster spec; ``overrides`` (flags that were given) win over the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read cluster spec {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(f"cluster spec {path} must be a mapping")
    known = {
        "model",
        "mode",
        "dtype",
        "device",
        "host",
        "threads",
        "compute",
        "trace",
        "scheduler",
        "attention",
        "experts",
    }
    unknown = set(raw) - known
    if unknown:
        raise InvalidArgument(f"cluster spec {path}: unknown keys {sorted(unknown)}")
    scheduler = raw.get("scheduler") or {}
    attention = raw.get("attention") or {}
    experts = raw.get("experts") or {}
    values: dict[str, Any] = {
        key: raw[key]
        for key in (
            "model",
            "mode",
            "dtype",
            "device",
            "host",
            "threads",
            "compute",
            "trace",
            "optimizations",
            "min_batch_tokens",
        )
        if raw.get(key) is not None
    }
    if "port" in scheduler:
        values["port"] = int(scheduler["port"])
    values["scheduler_args"] = [str(a) for a in scheduler.get("args", [])]
    if "count" in attention:
        values["attention"] = int(attention["count"])
    if "count" in experts:
        values["experts"] = int(experts["count"])
    values["attention_ranks"] = _rank_specs(attention.get("ranks"), "attention")
    values["expert_ranks"] = _rank_specs(experts.get("ranks"), "experts")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values.setdefault("attention", len(values["attention_ranks"]) or 2)
    values.setdefault("experts", len(values["expert_ranks"]) or 2)
    return ClusterSpec(**values)


@dataclass(slots=True)
class ServiceCommand:
    name: str
    argv: list[str]


def expert_commands(spec: ClusterSpec, model_dir: str) -> list[ServiceCommand]:
    return [
        ServiceCommand(
            f"expert-{r}",
            [
                "serve", "expert", "--model", model_dir, "--host", spec.host, "--port", str(rank.port),
                "--rank", str(r), "--num-ranks", str(spec.experts),
                "--dtype", rank.dtype or spec.dtype, "--device", rank.device or spec.device,
                "--threads", str(spec.rank_threads()), "--compute", spec.compute,
                "--optimizations", spec.optimizations, *rank.extra_args,
            ],
        )
        for r, rank in enumerate(spec.expert_ranks)
    ]  # fmt: skip


def attention_commands(
    spec: ClusterSpec, model_dir: str, expert_targets: Sequence[str]
) -> list[ServiceCommand]:
    return [
        ServiceCommand(
            f"attention-{r}",
            [
                "serve", "attention", "--model", model_dir, "--host", spec.host, "--port", str(rank.port),
                "--rank", str(r), "--experts", ",".join(expert_targets),
                "--dtype", rank.dtype or spec.dtype, "--device", rank.device or spec.device,
                "--threads", str(spec.rank_threads()), "--compute", spec.compute,
                "--optimizations", spec.optimizations, *rank.extra_args,
            ],
        )
        for r, rank in enumerate(spec.attention_ranks)
    ]  # fmt: skip


def scheduler_command(spec: ClusterSpec, model_dir: str, attention_targets: Sequence[str]) -> ServiceCommand:
    return ServiceCommand(
        "scheduler",
        [
            "serve", "scheduler", "--model", model_dir, "--host", spec.host, "--port", str(spec.port),
            "--attention", ",".join(attention_targets), "--mode", spec.mode,
            "--optimizations", spec.optimizations, "--min-batch-tokens", str(spec.min_batch_tokens or 0),
            *spec.scheduler_args,
        ],
    )  # fmt: skip


class ChildProcess:
    """One service child: its output forwarded with a prefix, its ready address captured."""

    def __init__(self, command: ServiceCommand, out: TextIO, env: dict[str, str] | None = None) -> None:
        self.name = command.name
        self.tail: deque[str] = deque(maxlen=40)
        self.address: str | None = None
        self._ready = threading.Event()
        self._out = out
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asap.cli", *command.argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # our signals reach children only through stop()
        )
        self._forwarder = threading.Thread(target=self._forward, name=f"log-{self.name}", daemon=True)
        self._forwarder.start()

    def _forward(self) -> None:
        if self.proc.stdout is None:
            return
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.tail.append(line)
            match = READY_LINE.match(line)
            if match and self.address is None:
                self.address = match.group("address")
                self._ready.set()
            print(f"[{self.name}] {line}", file=self._out, flush=True)
        self._ready.set()

    def wait_ready(self, deadline: float) -> str:
        """Block until the ready line; raise ``Unavailable`` with the child's output if it exits first."""
        self._ready.wait(max(0.0, deadline - time.monotonic()))
        if self.address is None:
            try:  # the output ended: the child is exiting; give it a moment to be reaped
                code: int | None = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            state = f"exited with code {code}" if code is not None else "did not become ready in time"
            raise Unavailable(f"{self.name} {state}; its last output:\n" + "\n".join(self.tail))
        return self.address

    def close(self) -> None:
        """Release the output pipe once the process has exited."""
        self._forwarder.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)


def wait_healthy(address: str, deadline: float) -> None:
    """Poll grpc health of ``address`` until SERVING or the deadline."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{address} did not report SERVING in time")
            time.sleep(0.1)


class LocalCluster:
    """Starts and stops the processes of a ``ClusterSpec``. Use ``start()``/``stop()`` or ``with``."""

    def __init__(
        self, spec: ClusterSpec, *, out: TextIO | None = None, start_timeout_s: float = 300.0
    ) -> None:
        self.spec = spec
        self.children: list[ChildProcess] = []
        self.address: str | None = None
        self._out = out or sys.stdout
        self._start_timeout_s = start_timeout_s
        self._collector: CollectorHandle | None = None
        self._child_env: dict[str, str] = {}

    def _launch(self, commands: Sequence[ServiceCommand], deadline: float) -> list[str]:
        batch = [ChildProcess(c, self._out, self._child_env) for c in commands]
        self.children.extend(batch)
        addresses = [child.wait_ready(deadline) for child in batch]
        for address in addresses:
            wait_healthy(address, deadline)
        return addresses

    def start(self) -> str:
        """Start every service; returns the scheduler's address. On failure everything is stopped."""
        from asap.model.tiny import resolve_model

        deadline = time.monotonic() + self._start_timeout_s
        model_dir = str(resolve_model(self.spec.model))  # once here, so children never race to create it
        if "min-batch" in parse_optimizations(self.spec.optimizations) and self.spec.min_batch_tokens is None:
            self.spec.min_batch_tokens = calibrated_knee(self.spec, model_dir)
            print(
                f"min-batch threshold: {self.spec.min_batch_tokens} tokens (expert knee)",
                file=self._out,
                flush=True,
            )
        try:
            if self.spec.trace:
                self._start_collector(self.spec.trace)
            experts = self._launch(expert_commands(self.spec, model_dir), deadline)
            attention = self._launch(attention_commands(self.spec, model_dir, experts), deadline)
            (self.address,) = self._launch([scheduler_command(self.spec, model_dir, attention)], deadline)
        except BaseException:
            self.stop()
            raise
        return self.address

    @property
    def trace_endpoint(self) -> str | None:
        """``OTEL_EXPORTER_OTLP_ENDPOINT`` of the cluster's collector while tracing, else ``None``: other
        processes (a traced client) can send their spans to the same file through it."""
        return self._collector.endpoint if self._collector is not None else None

    def _start_collector(self, path: str) -> None:
        """Receive every child's spans here and append them to ``path``; the children export over OTLP."""
        from asap.telemetry.collector import start_collector

        try:
            self._collector = start_collector("127.0.0.1:0", path)
        except OSError as exc:
            raise InvalidArgument(f"cannot trace to {path}: {exc}") from exc
        self._child_env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self._collector.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
        logger.info("tracing to %s (collector at %s)", path, self._collector.address)

    def failed_child(self) -> ChildProcess | None:
        """A child that exited on its own, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop in reverse start order, one tier at a time, so each tier drains while its downstream is up:
        the scheduler finishes its requests, then attention ranks their batches, then the expert ranks.
        SIGTERM, then SIGKILL for a child still running after ``grace_s``."""
        tiers: dict[str, list[ChildProcess]] = {}
        for child in self.children:
            tiers.setdefault(child.name.split("-")[0], []).append(child)
        for tier in ("scheduler", "attention", "expert"):
            members = tiers.get(tier, [])
            for child in members:
                child.send(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in members:
                try:
                    child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("%s did not stop within %.0fs; killing it", child.name, grace_s)
                    child.send(signal.SIGKILL)
                    child.proc.wait()
                child.close()
        self.children.clear()
        # After the children: they export what they still hold while shutting down.
        collector, self._collector = self._collector, None
        if collector is not None:
            collector.stop()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def calibrated_knee(spec: ClusterSpec, model_dir: str) -> int:
    """The expert knee for ``spec``'s backend: modeled for emulated compute, else measured once and cached
    under the cache directory (``asap calibrate`` measures and prints the same curve)."""
    import hashlib
    import json

    from asap.calibrate import calibrate
    from asap.model.tiny import tiny_cache_root

    key = json.dumps([str(Path(model_dir).resolve()), spec.compute, spec.experts, spec.device, spec.dtype])
    cache = tiny_cache_root().parent / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        return int(json.loads(cache.read_text())["knee_tokens"])
    import torch

    counts = (
        (128, 256, 512, 1024, 2048, 4096)
        if spec.compute == "torch"
        else (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    )
    result = calibrate(
        model_dir,
        spec.compute,
        spec.experts,
        counts,
        device=spec.device,
        dtype=getattr(torch, spec.dtype),
        repeats=2,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"knee_tokens": result.knee_tokens, "backend": result.backend, "key": key}))
    return result.knee_tokens
