"""One benchmark against one cluster: read its limits, then run the workload at each rate of the sweep.

Rates run one after another; each waits for all its requests, so the next starts on a drained cluster.
The client is built with ``retries=0``: a refused request is a failure the benchmark must count, not one
to hide by sending it again.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from asap.bench.checks import BenchWarning, host_bound_warning, offered_rate_warning, prefill_slowdown
from asap.bench.progress import ProgressBar
from asap.bench.runner import PrefillClient, RequestRecord, RunOptions, run_requests
from asap.bench.stats import RateResult, max_slo_rps, summarize
from asap.bench.workload import WorkloadSpec, build_requests, sequence_digest
from asap.client import AsapClient, ClusterState, TlsConfig
from asap.errors import InvalidArgument

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
"""The front doors ``asap bench`` can drive."""


class BenchClient(PrefillClient, Protocol):
    """A prefill client that can also describe its cluster (``AsapClient`` is one)."""

    async def cluster_state(self, *, timeout_s: float | None = None) -> ClusterState: ...


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything about a benchmark except where it runs."""

    workload: WorkloadSpec
    rates: Sequence[float | None]
    """Target rates in order; None only for a trace replayed at its own speed."""
    slo_ttft_ms: float = 5000.0
    timeout_s: float = 60.0
    """Per-request deadline."""
    max_in_flight: int = 4096
    progress: bool = True
    protocol: str = "grpc"
    """The front door to drive: ``grpc`` (``AsapClient``) or ``http`` (the OpenAI-compatible API)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InvalidArgument(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not self.rates:
            raise InvalidArgument("need at least one rate")
        if not self.slo_ttft_ms > 0:
            raise InvalidArgument(f"the TTFT SLO must be > 0 ms, got {self.slo_ttft_ms}")
        if not self.timeout_s > 0:
            raise InvalidArgument(f"timeout must be > 0 s, got {self.timeout_s}")
        if self.max_in_flight < 1:
            raise InvalidArgument(f"max in flight must be >= 1, got {self.max_in_flight}")

    def describe(self) -> dict[str, Any]:
        """The run's settings, for the JSON report."""
        return {
            "rates_rps": list(self.rates),
            "slo_ttft_ms": self.slo_ttft_ms,
            "slo_attainment_target": 0.9,
            "timeout_s": self.timeout_s,
            "max_in_flight": self.max_in_flight,
            "protocol": self.protocol,
        }


@dataclass(slots=True)
class SweepResult:
    """The results of one cluster (one mode of a ``--compare``), or why it has none."""

    label: str
    compute: str | None = None
    """``torch``, ``emulated:DEVICE``, or None when the cluster does not say."""
    cluster: dict[str, Any] = field(default_factory=dict)
    results: list[RateResult] = field(default_factory=list)
    error: str | None = None

    @property
    def emulated(self) -> bool:
        return (self.compute or "").startswith("emulated")

    @property
    def max_slo_rps(self) -> float | None:
        return max_slo_rps(self.results)

    def to_json(self) -> dict[str, Any]:
        """``{"max_slo_rps", "results", "compute", "emulated", "cluster", "error"}``."""
        return {
            "max_slo_rps": self.max_slo_rps,
            "results": [result.to_json() for result in self.results],
            "compute": self.compute,
            "emulated": self.emulated,
            "cluster": dict(self.cluster),
            "error": self.error,
        }


def _cluster_summary(state: ClusterState) -> dict[str, Any]:
    return {
        "mode": state.mode,
        "model": state.model,
        "model_type": state.model_type,
        "attention_ranks": len(state.attention_ranks) or None,
        "expert_ranks": len(state.expert_targets) or None,  # None: not reported
        "vocab_size": state.vocab_size,
        "max_prompt_tokens": state.max_prompt_tokens,
    }


async def bench_client(
    client: BenchClient,
    config: BenchConfig,
    label: str | None = None,
    *,
    compute: str | None = None,
    progress_stream: TextIO | None = None,
    host_checks: bool = True,
) -> SweepResult:
    """Run the sweep through ``client``. ``label`` names the results (default: the cluster's mode);
    ``compute`` overrides what the cluster reports about itself. ``host_checks=False``: this host's CPU
    says nothing about the run (a simulation on virtual time), so it is neither sampled nor checked."""
    state = await client.cluster_state()
    if state.vocab_size < 1 or state.max_prompt_tokens < 1:
        raise InvalidArgument(
            f"the cluster reports vocab_size={state.vocab_size}, max_prompt_tokens={state.max_prompt_tokens}"
        )
    sweep = SweepResult(
        label=label or state.mode,
        compute=compute or getattr(state, "compute", None) or None,
        cluster=_cluster_summary(state),
    )
    modeled_ms = _modeled_request_ms(state, sweep.compute) if sweep.emulated else None
    options = RunOptions(
        seed=config.workload.seed,
        vocab_size=state.vocab_size,
        slo_ttft_ms=round(config.slo_ttft_ms),
        timeout_s=config.timeout_s,
        max_in_flight=config.max_in_flight,
    )
    for rate in config.rates:
        requests = build_requests(config.workload, rate, max_prompt_tokens=state.max_prompt_tokens)
        rate_text = "trace speed" if rate is None else f"{rate:g} rps"
        bar = None
        if config.progress:
            stream = progress_stream if progress_stream is not None else sys.stderr
            bar = ProgressBar(len(requests), f"{sweep.label} @ {rate_text}", stream=stream)
        cpu_before = _cpu_times() if host_checks else None
        try:
            records = await run_requests(client, requests, options, bar)
        finally:
            if bar is not None:
                bar.close()
        result = summarize(
            rate,
            records,
            config.slo_ttft_ms,
            sequence=sequence_digest(requests, config.workload.seed),
            window_s=config.workload.duration_s,
        )
        result.host_cpu_busy = _busy_since(cpu_before)
        host_compute = sweep.compute if host_checks else None  # None: no host-bound check
        for warning in _checks(result, records, host_compute, modeled_ms):
            logger.warning("%s @ %s: %s", sweep.label, rate_text, warning.message)
            result.warnings.append(warning.to_json())
        sweep.results.append(result)
    return sweep


def _checks(
    result: RateResult,
    records: list[RequestRecord],
    compute: str | None,
    modeled_ms: Callable[[int], float] | None,
) -> list[BenchWarning]:
    slowdown = prefill_slowdown(records, modeled_ms) if modeled_ms is not None else None
    found = (
        offered_rate_warning(result.rate_rps, result.offered_rps),
        host_bound_warning(compute, result.host_cpu_busy, slowdown),
    )
    return [warning for warning in found if warning is not None]


def _modeled_request_ms(state: ClusterState, compute: str | None) -> Callable[[int], float] | None:
    """Modelled device time (ms) of one prompt alone on the cluster's emulated devices, by prompt length;
    None when the cluster's model is not readable here (a remote cluster) or ``compute`` is not emulated.

    The dtype is not reported by the scheduler; float32 (the cluster default) is assumed. A bf16 cluster
    is modelled a little slower than it is, which only makes the host-bound check more lenient.
    """
    # Deferred: these pull in torch (asap.model's package), needed only for an emulated run.
    from asap.emulation import costs
    from asap.emulation.profiles import parse_compute
    from asap.errors import AsapError
    from asap.model.config import load_config
    from asap.model.resolve import resolve_model

    try:
        _, profile = parse_compute(compute or "torch")
        model = state.model.removeprefix("random:")
        config = load_config(resolve_model(model))
    except (AsapError, OSError) as exc:
        logger.info(
            "no modelled device time for %s (%s): the host-bound check uses CPU load only", state.model, exc
        )
        return None
    if profile is None:
        return None
    ranks = len(state.expert_targets) or 1

    def modeled_ms(prompt_tokens: int) -> float:
        return 1000.0 * costs.request_s(config, prompt_tokens, profile, 4, ranks)

    return modeled_ms


async def bench_target(
    target: str,
    config: BenchConfig,
    label: str | None = None,
    *,
    compute: str | None = None,
    tls: TlsConfig | None = None,
    token: str | None = None,
) -> SweepResult:
    """Run the sweep against the scheduler at ``target`` (its gRPC address, or its HTTP one for
    ``config.protocol == "http"``), over mutual TLS with ``tls``, sending ``token``."""
    if config.protocol == "http":
        from asap.bench.http_client import OpenAIHttpClient  # aiohttp, only when asked for

        async with OpenAIHttpClient(target, timeout_s=config.timeout_s, tls=tls, token=token) as http:
            return await bench_client(http, config, label, compute=compute)
    async with AsapClient(target, timeout_s=config.timeout_s, retries=0, tls=tls, token=token) as client:
        return await bench_client(client, config, label, compute=compute)


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle) jiffies of all CPUs from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)


def _busy_since(before: tuple[int, int] | None) -> float | None:
    after = _cpu_times()
    if before is None or after is None or after[0] <= before[0]:
        return None
    return 1.0 - (after[1] - before[1]) / (after[0] - before[0])
