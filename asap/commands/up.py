"""``asap up``: a whole cluster on this machine, one command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from asap.cluster import ClusterSpec, LocalCluster, load_cluster_yaml
from asap.commands import SUMMARIES
from asap.dataplane.select import DATA_PLANES
from asap.dtypes import DTYPES
from asap.modes import MODES


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
        "--data-plane",
        choices=DATA_PLANES,
        default=None,
        help="--data-plane of every rank (default auto); nixl: NIXL WRITEs between ranks (needs the nixl "
        "extra; see docs/deploy.md for ranks on different hosts)",
    )
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
        "host": args.host,
        "port": args.port,
        "trace": args.trace,
        "mps": args.mps,
        "data_plane": args.data_plane,
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
    try:
        print(
            f"starting {spec.attention} attention + {spec.experts} expert ranks ({spec.mode}, model {spec.model})",
            flush=True,
        )
        address = cluster.start()
        started.set()
        print(f"ready: scheduler at {address}", flush=True)
        if spec.trace:
            print(f"tracing to {spec.trace} (asap trace summarize {spec.trace})", flush=True)
        while not stop.wait(0.5):
            failed = cluster.failed_child()
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
