"""``asap bench``: open-loop load against a cluster, a rate sweep, and side-by-side mode comparison.

workload   the request sequence (arrivals, prompt lengths), deterministic by seed
runner     sends a sequence open-loop and records each request
stats      per-rate statistics and max SLO-compliant RPS
sweep      one cluster: every rate of the sweep in turn
compare    one fresh local cluster per mode, the identical sequence for each
report     table, JSON, plot
progress   a dependency-free progress bar on stderr
"""

from asap.bench.compare import run_compare
from asap.bench.progress import ProgressBar
from asap.bench.runner import RequestRecord, RunOptions, run_requests
from asap.bench.stats import RateResult, max_slo_rps, summarize
from asap.bench.sweep import BenchConfig, SweepResult, bench_client, bench_target
from asap.bench.workload import BenchRequest, LengthSpec, Trace, WorkloadSpec, build_requests

__all__ = [
    "BenchConfig",
    "BenchRequest",
    "LengthSpec",
    "ProgressBar",
    "RateResult",
    "RequestRecord",
    "RunOptions",
    "SweepResult",
    "Trace",
    "WorkloadSpec",
    "bench_client",
    "bench_target",
    "build_requests",
    "max_slo_rps",
    "run_compare",
    "run_requests",
    "summarize",
]
