"""``asap simulate``: ``asap bench --compare`` on a virtual clock, at cluster scale, on one host.

The scheduler core and its policies, the attention and expert executors with their queues, merging,
dual-batch, the expert-overlap lock and the sync barrier run as the services run them, in one process on
a virtual clock (an event loop whose time jumps to the next timer), with an in-process transport instead
of gRPC and emulated compute (``--compute emulated:DEVICE``: shapes only, each op and transfer a timed
wait of its modelled length). Time is virtual: results do not depend on this host's load, and no
process per rank is needed. Results are labelled ``simulated`` (and ``emulated``).

Writes the table and the --json document of ``asap bench --compare`` (same keys, same per-rate
``sequence`` digest for the same workload flags, so two simulate runs, or a simulate run and an
emulated-cluster run, compare directly), plus ``simulation``: layout, per-mode run cost (wall seconds,
virtual seconds, events/s) and the tuned baselines' choices.

Layouts: ``disaggregated`` (attention ranks and expert ranks on devices of their own) and ``colocated``
(the expert ranks on the attention ranks' devices, whose attention and expert compute then serialise:
DP+EP as vLLM and SGLang run it). ``--attention-tp N``: an attention rank spans N devices (its layer time
divided by N plus two all-reduces per layer at the link bandwidth). The paper's two systems at 32
devices: ``--layout disaggregated --attention 4 --attention-tp 4 --experts 16`` and ``--layout colocated
--attention 8 --attention-tp 4 --experts 32``.

Fair baselines: ``sync-chunked`` runs once per --tune-chunk-tokens value and reports the best;
``sync`` likewise over --tune-sync-batch-tokens (its per-rank step budget) when given.

Routing: uniform by default; ``--route-skew S`` draws hot experts (per layer, the same for every attention
rank), so a DP+EP step waits for the expert ranks that host them. 0.3 reproduces the cost SGLang measured
for DeepSeek-V3's real routing at EP32 (benchmarks/README.md, "Routing skew").

Host costs (default 0: devices and links only; ``asap.sim.hostcost``): ``--dispatch-overhead-us`` is the
mean host delay of a rank's layer (charged on its dispatches, empty ones included), ``--host-jitter-us``
its spread (one draw per rank and layer: the sync barrier then waits for the slowest participant's),
``--host-cores`` / ``--host-cpu-us`` the CPU part of it on a few shared host cores (the emulated
cluster's processes share this host's), ``--barrier-overhead-us`` a fitted constant per sync barrier
release. The measured values for this
host's emulated cluster are in benchmarks/README.md.

Exit codes: 0 when every mode ran, 1 when one failed, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from asap.commands import add_documented_parser, add_max_inflight_flag, add_route_skew_flag, comma_separated
from asap.commands.bench import _modes, add_load_arguments, workload_from_args
from asap.dtypes import DTYPES

DEFAULT_CHUNKS = "2048,4096,8192,16384"
SERVER_DEVICES = 8
"""Accelerators of one server (DGX H200, Atlas 800 with Ascend 910): beyond it, an all-to-all crosses
every device's network port (``--links auto``)."""
PROFILE_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``--profile-clock``: the clock cProfile reads at every call and return. ``perf_counter`` is read without
entering the kernel; ``process_time`` enters it each time: on the 2-core VM the paper-scale 10 s window
took 15 s unprofiled, 37 s profiled on ``wall`` and 114 s on ``cpu`` (half of it system time, and calls
such as ``len`` at 4% of the profile; benchmarks/README.md, "The profiler's clock")."""


def _sizes(value: str) -> list[int]:
    if value.strip().lower() == "none":
        return []
    sizes = comma_separated(value, int, "token counts")
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected positive token counts or 'none', got {value!r}")
    return sizes


def add_parser(subparsers: Any) -> None:
    """Register ``asap simulate``."""
    parser = add_documented_parser(subparsers, "simulate", __doc__)
    parser.add_argument(
        "--compare",
        type=_modes,
        default="async,sync-chunked,sync",
        metavar="MODES",
        help="comma list of modes, one simulated cluster each (default async,sync-chunked,sync)",
    )
    add_load_arguments(parser)
    cluster = parser.add_argument_group("cluster (as for asap up / asap bench --compare)")
    cluster.add_argument("--model", help="checkpoint or config.json directory, or 'tiny'")
    cluster.add_argument("--attention", type=int, metavar="N", help="attention ranks (default 2)")
    cluster.add_argument("--experts", type=int, metavar="M", help="expert ranks (default 2)")
    cluster.add_argument(
        "--compute", default="emulated:h200", metavar="emulated:DEVICE", help="default emulated:h200"
    )
    cluster.add_argument("--dtype", choices=DTYPES, help="element size of the cost model (default float32)")
    cluster.add_argument("--optimizations", metavar="all|none|LIST")
    cluster.add_argument(
        "--max-batch-tokens",
        type=int,
        metavar="N",
        help="the scheduler's prompt tokens per batch (default 8192; sync's --tune-sync-batch-tokens "
        "overrides it for sync)",
    )
    add_route_skew_flag(cluster)
    add_max_inflight_flag(cluster)
    sim = parser.add_argument_group("simulation")
    sim.add_argument(
        "--layout",
        choices=("disaggregated", "colocated"),
        default="disaggregated",
        help="default disaggregated",
    )
    sim.add_argument("--attention-tp", type=int, default=1, metavar="N", help="devices per attention rank")
    sim.add_argument(
        "--links",
        choices=("auto", "pair", "ports"),
        default="auto",
        help="how transfers are charged: pair (each dispatch and result at the profile's link_gbps on its "
        "own, all in parallel, as the multi-process emulated cluster does) or ports (a device's transfers "
        "to all its peers share its network port, port_gbps: a rank's all-to-all takes its total bytes "
        "over the port, as across servers; asap/emulation/profiles.py). auto (default): ports when the "
        f"cluster spans more than one {SERVER_DEVICES}-device server and the profile is a real device "
        "(undilated, with a port figure); pair otherwise, so that a time-dilated profile (emulated:D/F, "
        "the multi-process emulated cluster's setting) compares with that cluster",
    )
    sim.add_argument(
        "--tune-chunk-tokens",
        type=_sizes,
        default=DEFAULT_CHUNKS,
        metavar="LIST|none",
        help=f"sync-chunked: chunk sizes to try, the best reported (default {DEFAULT_CHUNKS}; none: 8192)",
    )
    sim.add_argument(
        "--tune-sync-batch-tokens",
        type=_sizes,
        default="none",
        metavar="LIST|none",
        help="sync: per-rank step budgets (--max-batch-tokens) to try, the best reported (default none)",
    )
    sim.add_argument(
        "--dispatch-overhead-us",
        type=float,
        default=0.0,
        metavar="US",
        help="host cost added to every dispatch's link time (default 0: devices and links only); to "
        "compare with the multi-process emulated cluster, its measured per-layer cost beyond the model",
    )
    sim.add_argument(
        "--host-jitter-us",
        type=float,
        default=0.0,
        metavar="US",
        help="standard deviation of the per-layer host delay whose mean is --dispatch-overhead-us (default "
        "0: the mean every time); one draw per attention rank and layer from a shifted exponential, so a "
        "sync barrier pays the slowest of its participants' draws; at most --dispatch-overhead-us",
    )
    sim.add_argument(
        "--host-cores",
        type=int,
        default=0,
        metavar="N",
        help="host CPU cores every rank's host path shares (default 0: a host per rank, as on real servers); "
        "with it, --host-cpu-us of each rank's per-layer host delay is CPU work that waits for one of the N "
        "cores (the multi-process emulated cluster: its processes on this host's cores)",
    )
    sim.add_argument(
        "--host-cpu-us",
        type=float,
        default=0.0,
        metavar="US",
        help="with --host-cores: the CPU-work part of the per-layer host delay (at most "
        "--dispatch-overhead-us; the rest is latency that needs no core)",
    )
    sim.add_argument(
        "--barrier-overhead-us",
        type=float,
        default=0.0,
        metavar="US",
        help="sync modes: host cost charged once at every barrier release (default 0); to compare with the "
        "multi-process emulated cluster, its measured per-barrier excess over async (benchmarks/README.md)",
    )
    sim.add_argument(
        "--port-gbps",
        type=float,
        metavar="GB/S",
        help="with --links ports: every device's network port at this bandwidth (GB/s each way) instead "
        "of the profile's port_gbps (a what-if: e.g. 25 for 200 GE RoCE, 50 for 400 Gb/s)",
    )
    sim.add_argument(
        "--sync-planner",
        choices=("lpt", "per-rank"),
        default="lpt",
        help="sync modes' step planner: lpt (default: the best-placement baseline, one global step packed "
        "longest-first over every rank) or per-rank (what vLLM / SGLang DP+EP run: a front-end balancer "
        "gives each request a rank by request counts, 4 x waiting + running as vLLM's; each rank takes its "
        "batch from its own FIFO queue within its own budget; idle ranks run an empty batch)",
    )
    sim.add_argument(
        "--sim-transport",
        choices=("direct", "stream"),
        default="direct",
        help="how attention ranks reach expert ranks in the simulation: direct (default; the expert "
        "sessions' own handling, dispatches handed over without messages) or stream (the expert "
        "servicers' Exchange streams with shape-only protobuf chunks, as over gRPC; slower, same logic)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="OUT", help="write the results as JSON")
    out.add_argument("--plot", metavar="OUT.png", help="TTFT p90 and SLO attainment vs rate")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument(
        "--profile", metavar="OUT.prof", help="profile the simulator (cProfile): top entries to stderr"
    )
    out.add_argument(
        "--profile-clock",
        choices=sorted(PROFILE_CLOCKS),
        default="wall",
        help="the profiler's clock: wall (default; cheap to read: the run takes ~2.5x its unprofiled time) "
        "or cpu (the process's CPU time, which leaves out other processes' time on a busy host but is a "
        "system call per profiled call: ~7.5x, and small calls look larger)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the simulation the flags describe; print the table; write JSON/plot when asked."""
    from asap.bench.report import compare_document, format_table, write_json, write_plot
    from asap.bench.sweep import BenchConfig
    from asap.sim.cluster import Layout
    from asap.sim.run import Tuning, simulate_compare

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="asap simulate: %(levelname)s %(message)s")
    if args.port_gbps is not None and args.port_gbps <= 0:
        print("asap simulate: --port-gbps must be positive", file=sys.stderr)
        return 2
    workload, rates = workload_from_args(args)
    config = BenchConfig(
        workload=workload,
        rates=rates,
        slo_ttft_ms=args.slo_ttft_ms,
        timeout_s=args.timeout,
        max_in_flight=args.max_in_flight,
        progress=not args.no_progress,
    )
    fields = {
        "model": args.model,
        "attention": args.attention,
        "experts": args.experts,
        "compute": args.compute,
        "dtype": args.dtype,
        "optimizations": args.optimizations,
        "max_batch_tokens": args.max_batch_tokens,
        "route_skew": args.route_skew,
        "max_inflight": args.max_inflight,
    }
    links = resolve_links(args)
    layout = Layout(args.layout, args.attention_tp, links)
    tuning = Tuning({"sync-chunked": args.tune_chunk_tokens, "sync": args.tune_sync_batch_tokens})
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile(PROFILE_CLOCKS[args.profile_clock])
        profiler.enable()
    try:
        sweeps, stats = simulate_compare(
            args.compare,
            fields,
            config,
            layout,
            tuning,
            dispatch_overhead_s=args.dispatch_overhead_us * 1e-6,
            barrier_overhead_s=args.barrier_overhead_us * 1e-6,
            transport=args.sim_transport,
            host_options={
                "host_jitter_s": args.host_jitter_us * 1e-6,
                "host_cores": args.host_cores,
                "host_cpu_s": args.host_cpu_us * 1e-6,
                "sync_planner": args.sync_planner,
                "port_gbps": args.port_gbps,
            },
        )
    finally:
        if profiler is not None:
            profiler.disable()
            _report_profile(profiler, args.profile)
    settings = config.describe()
    settings["cluster"] = {key: value for key, value in fields.items() if value is not None}
    settings["modes"] = list(args.compare)
    document = compare_document(sweeps, settings, workload.describe())
    document["simulated"] = True
    document["simulation"] = {
        "layout": args.layout,
        "attention_tp": args.attention_tp,
        "links": links,
        "tune_chunk_tokens": args.tune_chunk_tokens,
        "tune_sync_batch_tokens": args.tune_sync_batch_tokens,
        "dispatch_overhead_us": args.dispatch_overhead_us,
        "barrier_overhead_us": args.barrier_overhead_us,
        "host_jitter_us": args.host_jitter_us,
        "host_cores": args.host_cores,
        "host_cpu_us": args.host_cpu_us,
        "transport": args.sim_transport,
        "sync_planner": args.sync_planner,
        "port_gbps": args.port_gbps,
        "runs": {mode: run_stats.to_json() for mode, run_stats in stats.items()},
    }
    print("SIMULATED (virtual clock) " + format_table(sweeps, config.slo_ttft_ms), flush=True)
    for mode, run_stats in stats.items():
        print(
            f"{mode}: {run_stats.virtual_s:.1f} s simulated in {run_stats.wall_s:.1f} s wall "
            f"({run_stats.cpu_s:.1f} s CPU), {run_stats.events} events ({run_stats.events_per_s:.0f}/s), devices "
            f"{run_stats.device_busy:.0%} busy"
            + (
                " ("
                + ", ".join(
                    f"{role} {busy:.0%}, busiest rank {run_stats.rank_busy_max.get(role, busy):.0%}"
                    for role, busy in run_stats.role_busy.items()
                )
                + ")"
                if run_stats.role_busy
                else ""
            )
            + (f", host cores {run_stats.host_busy:.0%} busy" if run_stats.host_busy is not None else ""),
            file=sys.stderr,
        )
        for name, row in run_stats.breakdown.get("classes", {}).items():
            print(
                f"{mode} {name} (prompt < / >= {run_stats.breakdown['split_tokens']} tokens): "
                f"{row['requests']} requests, TTFT mean {row['ttft_ms_mean']:.1f} ms, barrier wait mean "
                f"{row['barrier_ms_mean']:.1f} ms ({row['barrier_share_mean']:.0%} of TTFT per request, "
                f"{row['barrier_share_of_total']:.0%} of the summed TTFT), queue mean {row['queue_ms_mean']:.1f} ms",
                file=sys.stderr,
            )
    if args.json:
        write_json(document, args.json)
    if args.plot:
        try:
            write_plot(sweeps, config.slo_ttft_ms, args.plot)
        except ImportError as exc:
            print(f"asap simulate: no plot ({exc})", file=sys.stderr)
    return 1 if any(sweep.error is not None for sweep in sweeps.values()) else 0


def resolve_links(args: argparse.Namespace) -> str:
    """``--links`` with ``auto`` resolved (see its ``--help``)."""
    from asap.emulation.profiles import emulated_device, parse_compute
    from asap.errors import InvalidArgument

    if args.links != "auto":
        return str(args.links)
    try:
        device = emulated_device(args.compute)
        if device is None or device[1] is not None:  # torch (rejected later) or a time-dilated profile
            return "pair"
        profile = parse_compute(args.compute)[1]
    except InvalidArgument:  # reported where the cluster is built, as before
        return "pair"
    attention = args.attention if args.attention is not None else 2
    experts = args.experts if args.experts is not None else 2
    devices = attention * args.attention_tp + (experts if args.layout == "disaggregated" else 0)
    return (
        "ports"
        if profile is not None and profile.port_gbps is not None and devices > SERVER_DEVICES
        else "pair"
    )


def _report_profile(profiler: Any, path: str) -> None:
    import pstats

    profiler.dump_stats(path)
    stats = pstats.Stats(profiler, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
