"""``asap bench``: open-loop load against a cluster (``--target``) or one fresh local cluster per mode
(``--compare``); prints a table (stdout) and a progress bar (stderr); ``--json`` and ``--plot`` save it.

Exit codes: 0 when every cluster ran; 1 when a ``--compare`` mode failed to start or run (its error is in
the table and the JSON; the other modes still ran); 2 for bad flags or an unreachable ``--target``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from typing import Any

from asap.bench.compare import CLUSTER_FIELDS, run_compare
from asap.bench.report import compare_document, format_table, target_document, write_json, write_plot
from asap.bench.sweep import BenchConfig, SweepResult, bench_target
from asap.bench.workload import ARRIVALS, LengthSpec, Trace, WorkloadSpec, default_warmup
from asap.client import DEFAULT_TARGET
from asap.commands import (
    TARGET_ENV,
    add_client_security_flags,
    add_documented_parser,
    add_max_inflight_flag,
    add_route_skew_flag,
    client_security,
    cluster_target,
    comma_separated,
)
from asap.dtypes import DTYPES
from asap.errors import InvalidArgument
from asap.modes import MODES

DEFAULT_HTTP_TARGET = "localhost:8000"


def _rates(value: str) -> list[float]:
    rates = comma_separated(value, float, "rates")
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {value!r}")
    return rates


def _modes(value: str) -> list[str]:
    modes = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected distinct modes from {', '.join(MODES)}, got {value!r}")
    return modes


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags (``asap bench`` and ``asap simulate`` share them; ``workload_from_args`` reads
    them)."""
    load = parser.add_argument_group("load")
    load.add_argument("--arrival", choices=ARRIVALS, help="default: trace with --trace, else poisson")
    load.add_argument("--rate", type=float, metavar="RPS", help="target rate (default 1; trace: its own)")
    load.add_argument("--burstiness", type=float, metavar="CV", help="gamma arrivals' CV (default 1)")
    lengths = load.add_mutually_exclusive_group()
    lengths.add_argument(
        "--lengths",
        metavar="SPEC",
        help="fixed:N | uniform:A,B | lognormal:MEAN,SIGMA (default lognormal:1024,0.8)",
    )
    lengths.add_argument("--trace", metavar="FILE.csv", help="CSV with TIMESTAMP and ContextTokens columns")
    size = load.add_mutually_exclusive_group()
    size.add_argument("--requests", type=int, metavar="N", help="measured requests per rate (default 100)")
    size.add_argument("--duration", type=float, metavar="S", help="measured seconds per rate")
    load.add_argument(
        "--sweep", type=_rates, metavar="R1,R2,...", help="rates to run in turn (overrides --rate)"
    )
    load.add_argument(
        "--warmup", type=int, metavar="N", help="unmeasured requests first (default 10%%, <= 50)"
    )
    load.add_argument("--seed", type=int, default=0, metavar="S", help="default 0")
    load.add_argument("--slo-ttft-ms", type=float, default=5000.0, metavar="MS", help="default 5000")
    load.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per request (default 60)")
    load.add_argument(
        "--max-in-flight", type=int, default=4096, metavar="N", help="client limit (default 4096)"
    )


def add_parser(subparsers: Any) -> None:
    """Register ``asap bench``."""
    parser = add_documented_parser(subparsers, "bench", __doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--target", metavar="HOST:PORT", help=f"default: ${TARGET_ENV} or {DEFAULT_TARGET}")
    where.add_argument(
        "--compare", type=_modes, metavar="MODES", help="comma list of modes, one fresh local cluster each"
    )
    parser.add_argument(
        "--protocol",
        choices=("grpc", "http"),
        default="grpc",
        help="front door to drive: grpc (default; --target HOST:PORT of the scheduler) or http (the "
        f"OpenAI-compatible API: --target HOST:PORT of its --http-port, default {DEFAULT_HTTP_TARGET})",
    )
    add_load_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="write the results as JSON")
    out.add_argument("--plot", metavar="OUT.png", help="TTFT p90 and SLO attainment vs rate")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--cluster-log", metavar="FILE", help="--compare: child logs (default: a temp file)")
    add_client_security_flags(parser.add_argument_group("security (with --target)"))
    cluster = parser.add_argument_group("cluster (with --compare; as for asap up)")
    cluster.add_argument("--model", help="checkpoint directory, config.json (emulated), 'tiny' or random:DIR")
    cluster.add_argument("--attention", type=int, metavar="N")
    cluster.add_argument("--experts", type=int, metavar="M")
    cluster.add_argument("--compute", metavar="torch|emulated:DEVICE")
    cluster.add_argument("--device", metavar="cpu|cuda")
    cluster.add_argument("--dtype", choices=DTYPES)
    cluster.add_argument("--optimizations", metavar="all|none|LIST")
    cluster.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        help="the scheduler's prompt tokens per batch (default 8192)",
    )
    add_route_skew_flag(cluster)
    add_max_inflight_flag(cluster)
    parser.set_defaults(func=run)


def workload_from_args(args: argparse.Namespace) -> tuple[WorkloadSpec, list[float | None]]:
    """The workload and the rates to run, from the flags; ``InvalidArgument`` for bad combinations."""
    arrival = args.arrival or ("trace" if args.trace else "poisson")
    if args.burstiness is not None and arrival != "gamma":
        raise InvalidArgument("--burstiness applies to --arrival gamma")
    trace = Trace.load(args.trace) if args.trace else None
    rates: list[float | None] = list(args.sweep) if args.sweep else [args.rate]
    if rates == [None] and arrival != "trace":
        rates = [1.0]
    if args.rate is not None and not args.rate > 0:
        raise InvalidArgument(f"--rate must be > 0, got {args.rate}")
    requests = args.requests if args.requests is not None or args.duration is not None else 100
    first_rate = rates[0] or (trace.mean_rate_rps if trace else 1.0)
    warmup = args.warmup if args.warmup is not None else default_warmup(requests, args.duration, first_rate)
    spec = WorkloadSpec(
        arrival=arrival,
        lengths=LengthSpec.parse(args.lengths) if args.lengths else None,
        trace=trace,
        burstiness=args.burstiness if args.burstiness is not None else 1.0,
        requests=requests,
        duration_s=args.duration,
        warmup=warmup,
        seed=args.seed,
    )
    return spec, rates


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe; print the table; write JSON/plot when asked."""
    if not logging.getLogger().handlers:  # a bare CLI run: show asap's lifecycle lines and warnings
        logging.basicConfig(level=logging.WARNING, format="asap bench: %(levelname)s %(message)s")
        logging.getLogger("asap").setLevel(logging.INFO)
    cluster_fields = {name: getattr(args, name) for name in CLUSTER_FIELDS}
    if not args.compare and any(value is not None for value in cluster_fields.values()):
        raise InvalidArgument("cluster flags (--model, --attention, ...) apply only with --compare")
    if args.compare and (args.tls or args.token_file):
        raise InvalidArgument("--tls and --token-file apply to --target (--compare starts its own clusters)")
    workload, rates = workload_from_args(args)
    config = BenchConfig(
        workload=workload,
        rates=rates,
        slo_ttft_ms=args.slo_ttft_ms,
        timeout_s=args.timeout,
        max_in_flight=args.max_in_flight,
        progress=not args.no_progress,
        protocol=args.protocol,
    )
    settings = config.describe()
    sweeps: dict[str, SweepResult]
    if args.compare:
        settings["cluster"] = {key: value for key, value in cluster_fields.items() if value is not None}
        settings["modes"] = list(args.compare)
        log_path = args.cluster_log or _temp_log_path()
        print(f"asap bench: cluster logs in {log_path}", file=sys.stderr, flush=True)
        with open(log_path, "a") as log:
            sweeps = run_compare(args.compare, cluster_fields, config, log=log)
        document = compare_document(sweeps, settings, workload.describe())
    else:
        target = (
            cluster_target(args.target) if args.protocol == "grpc" else args.target or DEFAULT_HTTP_TARGET
        )
        sweep = asyncio.run(bench_target(target, config, None, **client_security(args)))
        sweeps = {sweep.label: sweep}
        document = target_document(target, sweep, settings, workload.describe())
    print(format_table(sweeps, config.slo_ttft_ms), flush=True)
    if args.json:
        write_json(document, args.json)
    if args.plot:
        write_plot(sweeps, config.slo_ttft_ms, args.plot)
    return 1 if any(sweep.error is not None for sweep in sweeps.values()) else 0


def _temp_log_path() -> str:
    handle, path = tempfile.mkstemp(prefix="asap-bench-", suffix=".log")
    os.close(handle)
    return path
