"""``--compare``: one fresh local cluster per mode, in turn, each given the identical request sequence.

The sequence depends only on the workload flags and the seed (and the model's vocabulary and length
limit, which every mode shares), so each mode replays exactly the same requests; the per-rate
``sequence`` fingerprint in the results shows it. Modes run one at a time on the same machine, so they
never compete for it. A mode whose cluster fails to start or whose run fails is recorded with its error
and the others still run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TextIO

from asap.bench.sweep import BenchConfig, SweepResult, bench_target
from asap.cluster import ClusterSpec, LocalCluster

logger = logging.getLogger(__name__)

CLUSTER_FIELDS = (
    "model", "attention", "experts", "compute", "device", "dtype", "optimizations", "max_batch_tokens",
    "route_skew", "max_inflight",
)  # fmt: skip
"""``asap up`` flags that ``--compare`` passes to each mode's cluster."""


class Cluster(Protocol):
    """What ``--compare`` needs of a cluster (``asap.cluster.LocalCluster`` is one)."""

    def start(self) -> str: ...

    def stop(self) -> None: ...


ClusterFactory = Callable[[ClusterSpec, TextIO], Cluster]
BenchFn = Callable[[str, BenchConfig, str, str | None], SweepResult]


def local_cluster(spec: ClusterSpec, out: TextIO) -> Cluster:
    """The default factory: a ``LocalCluster`` whose child logs go to ``out``."""
    return LocalCluster(spec, out=out)


def run_bench(target: str, config: BenchConfig, label: str, compute: str | None) -> SweepResult:
    """The default runner: the sweep against ``target`` on a fresh event loop."""
    return asyncio.run(bench_target(target, config, label, compute=compute))


def cluster_spec(mode: str, fields: Mapping[str, Any]) -> ClusterSpec:
    """The spec of one mode: the given cluster fields (None = default) on a free port.

    Only fields the caller set are passed, so fields this ``ClusterSpec`` does not know yet (e.g.
    ``compute`` or ``optimizations`` on an older tree) raise a clear error only when actually asked for.
    """
    given = {key: value for key, value in fields.items() if value is not None}
    try:
        return ClusterSpec(**given, mode=mode, port=0)
    except TypeError as exc:
        raise ValueError(f"this cluster does not support {sorted(given)}: {exc}") from None


def http_target(cluster: Cluster) -> str:
    """The HTTP front door of a started cluster (``LocalCluster.http_url``)."""
    url = getattr(cluster, "http_url", None)
    if not url:
        cluster.stop()
        raise ValueError("the cluster reported no HTTP address")
    return str(url)


def compute_label(fields: Mapping[str, Any]) -> str:
    """What the clusters compute with: the ``compute`` field, ``torch`` when unset."""
    return str(fields.get("compute") or "torch")


def run_compare(
    modes: Sequence[str],
    fields: Mapping[str, Any],
    config: BenchConfig,
    *,
    log: TextIO,
    factory: ClusterFactory = local_cluster,
    bench: BenchFn = run_bench,
) -> dict[str, SweepResult]:
    """For each mode: start a cluster from ``fields`` + mode, run the sweep, stop it. Child logs go to
    ``log``. Returns the results by mode, in the given order; failed modes carry ``error``."""
    results: dict[str, SweepResult] = {}
    compute = compute_label(fields)
    for mode in modes:
        logger.info("compare: starting the %s cluster", mode)
        try:
            spec = cluster_spec(mode, fields)
            if config.protocol == "http":
                spec.http_port = 0
            cluster = factory(spec, log)
            target = cluster.start()
            if config.protocol == "http":
                target = http_target(cluster)
        except Exception as exc:  # a mode that cannot start is a result, not the end of the run
            logger.error("compare: the %s cluster did not start: %s", mode, exc)
            results[mode] = SweepResult(label=mode, compute=compute, error=f"cluster start failed: {exc}")
            continue
        try:
            results[mode] = bench(target, config, mode, compute)
            # The scheduler may not report every rank count; the spec knows them.
            for key, count in (("attention_ranks", spec.attention), ("expert_ranks", spec.experts)):
                if not results[mode].cluster.get(key):
                    results[mode].cluster[key] = count
        except Exception as exc:
            logger.error("compare: the %s run failed: %s", mode, exc)
            results[mode] = SweepResult(label=mode, compute=compute, error=f"benchmark failed: {exc}")
        finally:
            cluster.stop()
    return results
