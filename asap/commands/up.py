"""``asap up``: a whole cluster on this machine, one command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from asap.cluster import ClusterSpec, LocalCluster, load_cluster_yaml
from asap.commands import SUMMARIES, add_max_inflight_flag, add_route_skew_flag
from asap.commands.serve import metrics_port
from asap.dataplane.select import DATA_PLANES
from asap.dtypes import DTYPES
from asap.modes import MODES
from asap.supervise import RESTART_POLICIES, RestartPlan


def add_parser(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help=SUMMARIES["up"],
        description="Start a local cluster; prints 'ready: scheduler at HOST:PORT' and runs until Ctrl-C/SIGTERM.",
    )
    up.add_argument("--model", default=None, help="checkpoint dir, 'tiny' (default) or random:DIR")
    up.add_argument("--attention", type=int, default=None, help="attention ranks (default 2)")
    up.add_argument("--experts", type=int, default=None, help="expert ranks (default 2)")
    up.add_argument("--mode", choices=MODES, default=None, help="scheduling mode (default async)")
    up.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default float32)")
    up.add_argument("--device", default=None, help="torch device for every rank (default cpu)")
    up.add_argument(
        "--compute",
        default=None,
        help="torch (default) or emulated:DEVICE, e.g. emulated:h200 (no real math)",
    )
    up.add_argument(
        "--optimizations",
        default=None,
        help="all (default), none, or a comma list of min-batch, dual-batch, expert-overlap, layer-agnostic",
    )
    up.add_argument(
        "--min-batch-tokens",
        type=int,
        default=None,
        help="min-batch threshold (default: the calibrated knee)",
    )
    up.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="prompt tokens per batch the scheduler forms, at most (default 8192; attention ranks warm up "
        "batches of up to 16384)",
    )
    up.add_argument("--host", default=None, help="address every service binds (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="scheduler port (default 50051)")
    up.add_argument(
        "--trace",
        default=None,
        metavar="FILE.jsonl",
        help="trace every service into FILE (OTLP JSON lines) through a collector run by this command",
    )
    up.add_argument(
        "--mps",
        choices=("auto", "on", "off"),
        default=None,
        help="CUDA MPS for ranks sharing a GPU: auto (default: start a daemon for the cluster's lifetime when "
        "ranks share a GPU, none serves and nvidia-cuda-mps-control is installed), on (always; fail if "
        "impossible), off (never)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="P",
        help="the scheduler also serves the OpenAI-compatible HTTP API on port P (0 picks a free one); "
        "printed as 'openai: http://HOST:P/v1'",
    )
    up.add_argument(
        "--metrics-port",
        type=metrics_port,
        default=None,
        metavar="PORT",
        help="Prometheus metrics: the scheduler's (the cluster's request view) on PORT, every other service "
        "on the ports after it (attention ranks, then expert ranks); 0 gives each a free port; each URL is "
        "printed once ready; default: none",
    )
    up.add_argument(
        "--tls",
        default=None,
        metavar="DIR",
        help="mutual TLS between every service and for clients: a CA and certificates made in DIR on first "
        "use (reused after); clients use DIR/client, e.g. asap prefill --tls DIR",
    )
    up.add_argument(
        "--auth-token-file",
        default=None,
        metavar="FILE",
        help="the scheduler requires 'authorization: Bearer TOKEN', TOKEN one of FILE's lines (re-read on "
        "SIGHUP to the scheduler); clients: asap prefill --token-file F",
    )
    up.add_argument(
        "--restart",
        choices=RESTART_POLICIES,
        default="no",
        help="no (default: a child that exits stops the cluster) or on-failure (restart it on the same "
        "address, backing off 1 s doubling to 30 s, and log it)",
    )
    up.add_argument(
        "--data-plane",
        choices=DATA_PLANES,
        default=None,
        help="--data-plane of every rank (default auto); nixl: NIXL WRITEs between ranks (needs the nixl "
        "extra; see docs/deploy.md for ranks on different hosts)",
    )
    add_route_skew_flag(up)
    add_max_inflight_flag(up)
    up.add_argument("--config", default=None, help="YAML cluster spec; flags given here override it")
    up.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    overrides = {
        "model": args.model,
        "attention": args.attention,
        "experts": args.experts,
        "mode": args.mode,
        "dtype": args.dtype,
        "device": args.device,
        "compute": args.compute,
        "optimizations": args.optimizations,
        "min_batch_tokens": args.min_batch_tokens,
        "max_batch_tokens": args.max_batch_tokens,
        "host": args.host,
        "port": args.port,
        "trace": args.trace,
        "mps": args.mps,
        "http_port": args.http_port,
        "metrics_port": args.metrics_port,
        "tls": getattr(args, "tls", None),
        "auth_token_file": getattr(args, "auth_token_file", None),
        "data_plane": args.data_plane,
        "route_skew": args.route_skew,
        "max_inflight": args.max_inflight,
    }
    if args.config:
        return load_cluster_yaml(args.config, overrides)
    return ClusterSpec(**{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    stop = threading.Event()
    started = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if not started.is_set():
            raise KeyboardInterrupt  # abort start-up; the finally below stops what was started
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(spec)
    if spec.auth_token_file:  # SIGHUP here re-reads the tokens in the scheduler, as it does there
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: cluster.reload_tokens())
    try:
        print(
            f"starting {spec.attention} attention + {spec.experts} expert ranks ({spec.mode}, model {spec.model})",
            flush=True,
        )
        address = cluster.start()
        started.set()
        print(f"ready: scheduler at {address}", flush=True)
        if cluster.http_url:
            print(f"openai: {cluster.http_url}/v1", flush=True)
        for name, url in cluster.metrics_urls().items():
            print(f"metrics: {name} at {url}", flush=True)
        if spec.tls:
            print(
                f"tls: on (client certificate in {spec.tls}/client; asap prefill --tls {spec.tls})",
                flush=True,
            )
        if spec.trace:
            print(f"tracing to {spec.trace} (asap trace summarize {spec.trace})", flush=True)
        plan = RestartPlan(getattr(args, "restart", "no"))
        while not stop.wait(0.5):
            failed = cluster.supervise(plan)
            if failed is not None:
                print(
                    f"asap: error: {failed.name} exited with code {failed.proc.returncode}; stopping the cluster",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        print("stopping cluster", flush=True)
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
