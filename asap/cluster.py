"""A local cluster: scheduler + N attention ranks + M expert ranks as child processes of one command.

Start order follows the data flow: expert ranks first (attention ranks ask them what they host at
start-up), then attention ranks, then the scheduler. Each child is an ``asap.child_process.ChildProcess``:
the launcher waits for its ready line, then for grpc health. Internal ranks bind port 0 unless the spec
pins a port. If a child exits during start-up, the launcher stops the others and raises with that child's
last lines. What to start comes from ``asap.clusterspec``; this module owns the processes' lifetime
(start, supervise and restart, stop in tiers) and what is shared by all of them (TLS material, the trace
collector, MPS).

The names of the modules it is built from stay importable from here (``from asap.cluster import
ClusterSpec, LocalCluster``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from asap.child_process import METRICS_LINE, READY_LINE, ChildProcess, wait_healthy
from asap.clusterspec import (
    ClusterSpec,
    RankSpec,
    ServiceCommand,
    attention_commands,
    expert_commands,
    load_cluster_yaml,
    scheduler_command,
)
from asap.errors import InvalidArgument, Unavailable
from asap.knee_cache import calibrated_knee
from asap.mps import ClusterMps
from asap.optimizations import parse_optimizations
from asap.supervise import RestartPlan

if TYPE_CHECKING:
    from asap.rpc.tls import TlsConfig
    from asap.telemetry.collector import CollectorHandle

logger = logging.getLogger(__name__)


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
        self._mps: ClusterMps | None = None

    def _launch(self, commands: Sequence[ServiceCommand], deadline: float) -> list[str]:
        batch = [ChildProcess(c, self._out, self._child_env) for c in commands]
        self.children.extend(batch)
        addresses = [child.wait_ready(deadline) for child in batch]
        for address in addresses:
            wait_healthy(address, deadline, self.client_tls)
        return addresses

    @property
    def client_tls(self) -> TlsConfig | None:
        """The client certificate of a cluster with TLS (what ``asap prefill --tls DIR`` uses), else None."""
        if self.spec.tls is None:
            return None
        from asap.rpc.tls import TlsConfig

        return TlsConfig.from_dir(self.spec.tls)

    def _prepare_tls(self) -> None:
        """Make the TLS directory's CA and certificates if missing (once; later starts reuse them)."""
        if self.spec.tls is None:
            return
        from asap.certs import ensure_cluster_certs

        issued = ensure_cluster_certs(self.spec.tls, [self.spec.host])
        if issued:
            print(
                f"tls: issued {', '.join(issued)} certificates in {self.spec.tls}", file=self._out, flush=True
            )

    def start(self) -> str:
        """Start every service; returns the scheduler's address. On failure everything is stopped."""
        from asap.model.resolve import model_argument

        deadline = time.monotonic() + self._start_timeout_s
        # Resolved once here, so children never race to create the built-in model; random:DIR stays a
        # random-weights spec (with DIR made absolute).
        model_dir = model_argument(self.spec.model)
        if "min-batch" in parse_optimizations(self.spec.optimizations) and self.spec.min_batch_tokens is None:
            self.spec.min_batch_tokens = calibrated_knee(self.spec, model_dir)
            print(
                f"min-batch threshold: {self.spec.min_batch_tokens} tokens (expert knee)",
                file=self._out,
                flush=True,
            )
        try:
            self._prepare_tls()
            self._prepare_gpus()
            if self.spec.trace:
                self._start_collector(self.spec.trace)
            experts = self._launch(expert_commands(self.spec, model_dir), deadline)
            attention = self._launch(attention_commands(self.spec, model_dir, experts), deadline)
            (self.address,) = self._launch([scheduler_command(self.spec, model_dir, attention)], deadline)
        except BaseException:
            self.stop()
            raise
        return self.address

    def metrics_urls(self) -> dict[str, str]:
        """Each started service's metrics endpoint by service name (``scheduler`` first), when it serves one."""
        children = sorted(self.children, key=lambda c: c.name != "scheduler")
        return {c.name: c.metrics_url for c in children if c.metrics_url is not None}

    @property
    def http_url(self) -> str | None:
        """The scheduler's OpenAI HTTP base URL (``http://HOST:PORT``) when the spec asks for one."""
        return next((c.http_url for c in self.children if c.name == "scheduler"), None)

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
        self._child_env.update(
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": self._collector.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            }
        )
        logger.info("tracing to %s (collector at %s)", path, self._collector.address)

    def rank_devices(self) -> list[str]:
        """The torch device of every attention and expert rank."""
        return self.spec.rank_devices(self.spec.attention_ranks) + self.spec.rank_devices(
            self.spec.expert_ranks
        )

    def _prepare_gpus(self) -> None:
        """For CUDA ranks: MPS where ranks share a GPU (``asap.mps``), and every kernel module loaded at
        context creation (``CUDA_MODULE_LOADING=EAGER``, unless set already), so no kernel is loaded
        lazily while serving: a first launch during another stream's wait has hung a process, and each
        lazy load costs the request that meets it (``asap.warmup``)."""
        devices = self.rank_devices()
        cuda = any(d.startswith("cuda") for d in devices)
        if cuda and "CUDA_MODULE_LOADING" not in os.environ:
            self._child_env["CUDA_MODULE_LOADING"] = "EAGER"
        if cuda or self.spec.mps == "on":  # on with CPU ranks only: decide() says why it cannot be
            self._mps = ClusterMps(self.spec.mps, devices)
            self._child_env.update(self._mps.start())

    def reload_tokens(self) -> None:
        """Have the scheduler re-read its token file (SIGHUP to it; ``asap up`` forwards its own)."""
        for child in self.children:
            if child.name == "scheduler":
                child.send(signal.SIGHUP)

    def failed_child(self) -> ChildProcess | None:
        """A child that exited on its own, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def restart(self, name: str, timeout_s: float = 120.0) -> ChildProcess:
        """Start child ``name`` again on the address it had (after it exited); waits until it serves."""
        old = next(c for c in self.children if c.name == name)
        if old.proc.poll() is None:
            raise InvalidArgument(f"{name} is still running")
        old.close()
        child = ChildProcess(old.pinned_command(), self._out, self._child_env)
        self.children[self.children.index(old)] = child
        deadline = time.monotonic() + timeout_s
        wait_healthy(child.wait_ready(deadline), deadline)
        return child

    def supervise(self, plan: RestartPlan) -> ChildProcess | None:
        """One round of ``plan``: schedule restarts of children that exited, restart those that are due.
        Returns a child that exited and is not restarted (the cluster should stop), else ``None``."""
        now = time.monotonic()
        for child in self.children:
            code = child.proc.poll()
            if code is None or child.name in plan.due:
                continue
            delay = plan.exited(child.name, code, now - child.started_at, now)
            if delay is None:
                return child
            logger.warning("%s exited with code %d; restarting it in %.1f s", child.name, code, delay)
            print(
                f"{child.name} exited with code {code}; restarting it in {delay:.1f} s",
                file=self._out,
                flush=True,
            )
        for name in plan.ready(now):
            try:
                child = self.restart(name)
            except Unavailable as exc:  # it died again during start-up: the next round backs off further
                logger.warning("restart of %s failed: %s", name, exc)
                continue
            print(f"{name} restarted at {child.address}", file=self._out, flush=True)
        return None

    def stop(self, grace_s: float = 40.0) -> None:
        """Stop in reverse start order, one tier at a time, so each tier drains while its downstream is up:
        the scheduler finishes its requests, then attention ranks their batches, then the expert ranks.
        SIGTERM, then SIGKILL for a child still running after ``grace_s`` (above the services' drain
        timeouts, 30 s at most by default, so a drain under load is not cut short)."""
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
        mps, self._mps = self._mps, None
        if mps is not None:
            mps.stop()  # after the children: MPS clients must be gone before the daemon quits

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "METRICS_LINE",
    "READY_LINE",
    "ChildProcess",
    "ClusterSpec",
    "LocalCluster",
    "RankSpec",
    "ServiceCommand",
    "attention_commands",
    "calibrated_knee",
    "expert_commands",
    "load_cluster_yaml",
    "scheduler_command",
    "wait_healthy",
]
