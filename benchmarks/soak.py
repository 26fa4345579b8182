"""Soak: a local cluster at a fraction of its capacity for a long time; do its processes grow?

Starts a local cluster (default 2 attention + 2 expert ranks, the tiny model, CPU, the data plane ``asap
up`` picks: the fast plane on one host), measures its capacity closed-loop, then sends Poisson load at
``--load`` of it (default 0.7) for ``--duration-s`` (default 30 min), sampling every service each
``--interval-s`` (default 60 s): RSS, open file descriptors, threads and the /dev/shm segments it maps or
holds. Reports per process the first and last sample and the growth per hour (least-squares slope over
the samples after the first, which is taken once the load runs: warm-up allocations are not growth),
the calls and their statuses, and the asap_* segments left in /dev/shm after the cluster stopped.

    python benchmarks/soak.py [--duration-s 1800] [--interval-s 60] [--load 0.7] [--mode async] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster_load import capacity, prompt, warm_up

from asap.bench.faultload import OK, Load, open_loop
from asap.bench.procstats import ProcSample, per_hour, sample
from asap.client import AsapClient
from asap.cluster import ClusterSpec, LocalCluster


async def soak(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    assert cluster.address is not None
    pids = {c.name: c.proc.pid for c in cluster.children}
    pids["client"] = os.getpid()
    samples: dict[str, list[ProcSample]] = {name: [] for name in pids}
    async with AsapClient(cluster.address, timeout_s=30.0, retries=0) as client:
        await warm_up(client)
        cap = await capacity(client, args.capacity_s)
        rate = args.load * cap
        print(f"capacity {cap:.1f} rps; soaking at {rate:.1f} rps for {args.duration_s:.0f} s", flush=True)
        started = time.monotonic()
        end = started + args.duration_s
        load = Load()
        runner = asyncio.create_task(
            open_loop(client, rate, lambda: time.monotonic() >= end, prompt=prompt, load=load)
        )
        while True:
            now = time.monotonic()
            for name, pid in pids.items():
                got = sample(pid, now - started)
                if got is not None:
                    samples[name].append(got)
            ok = sum(c.status == OK for c in load.calls)
            line = ", ".join(
                f"{n} {s[-1].rss_kib // 1024}M/{s[-1].fds}fd/{s[-1].threads}t/{len(s[-1].shm)}shm"
                for n, s in samples.items()
                if s
            )
            print(f"[{now - started:6.0f}s] {ok}/{len(load.calls)} ok; {line}", flush=True)
            if now >= end:
                break
            await asyncio.sleep(min(args.interval_s, max(0.0, end - time.monotonic())))
        await runner
    statuses: dict[str, int] = {}
    for call in load.calls:
        statuses[call.status] = statuses.get(call.status, 0) + 1
    return {
        "capacity_rps": round(cap, 2),
        "rate_rps": round(rate, 2),
        "duration_s": args.duration_s,
        "calls": len(load.calls),
        "statuses": statuses,
        "failures": sorted({f"{c.status}: {c.message}" for c in load.calls if c.status != OK})[:10],
        "processes": {name: summary(series) for name, series in samples.items()},
    }


def summary(series: list[ProcSample]) -> dict[str, Any]:
    steady = series[1:] if len(series) > 2 else series
    times = [s.at_s for s in steady]
    return {
        "samples": len(series),
        "first": {
            "rss_mib": series[0].rss_kib / 1024,
            "fds": series[0].fds,
            "threads": series[0].threads,
            "shm": len(series[0].shm),
        },
        "last": {
            "rss_mib": series[-1].rss_kib / 1024,
            "fds": series[-1].fds,
            "threads": series[-1].threads,
            "shm": len(series[-1].shm),
        },
        "per_hour": {
            "rss_mib": round(per_hour(times, [s.rss_kib / 1024 for s in steady]), 2),
            "fds": round(per_hour(times, [s.fds for s in steady]), 2),
            "threads": round(per_hour(times, [s.threads for s in steady]), 2),
            "shm": round(per_hour(times, [len(s.shm) for s in steady]), 2),
        },
        "shm_segments": sorted(set().union(*(s.shm for s in series))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration-s", type=float, default=1800.0, help="how long the load runs (default 30 min)"
    )
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--capacity-s", type=float, default=10.0)
    parser.add_argument("--mode", default="async")
    parser.add_argument("--attention", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--log", default=os.devnull, help="the children's output goes here")
    args = parser.parse_args()
    spec = ClusterSpec(model="tiny", attention=args.attention, experts=args.experts, mode=args.mode, port=0)
    with open(args.log, "a") as log:
        cluster = LocalCluster(spec, out=log)
        cluster.start()
        try:
            report = asyncio.run(soak(cluster, args))
        finally:
            cluster.stop()
    seen = set().union(*(set(p["shm_segments"]) for p in report["processes"].values()))
    report["shm_left_after_stop"] = sorted(s for s in seen if os.path.exists(s))
    report["host_cpus"] = os.cpu_count()
    report["load_average_at_end"] = os.getloadavg()
    for name, proc in report["processes"].items():
        print(f"{name:12s} {proc['first']} -> {proc['last']}  per hour {proc['per_hour']}")
    print(
        f"calls {report['calls']} {report['statuses']}; shm left after stop: {report['shm_left_after_stop']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
