"""Faults under load: SIGKILL and SIGSTOP/SIGCONT an expert rank and an attention rank of a local cluster
at a fraction of its capacity, in each mode and data plane, and report what happened to the calls.

For each (mode, data plane) one local cluster (2 attention + 2 expert ranks, the tiny model, CPU) runs
four faults in turn on rank 1 of a kind: a SIGSTOP held ``--hold-s`` then SIGCONT, and a SIGKILL followed
by a restart on the same address after ``--hold-s`` (``LocalCluster.restart``, what ``asap up --restart
on-failure`` does). Load is Poisson at ``--load`` of the capacity measured closed-loop first. Per fault:
calls, failures (with status), max time from the fault to a typed failure, lost calls (no answer or an
untyped error), hangs (deadline reached), failures outside the fault window (after the rank was back),
whether every other child stayed up, and the seconds until the rank served again.

    python benchmarks/faults.py [--modes async,sync] [--planes auto,grpc] [--load 0.5] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cluster_load import capacity, prompt, warm_up

from asap.bench.faultload import OK, Call, Load, one_call, open_loop, summarize
from asap.child_process import ChildProcess
from asap.client import AsapClient
from asap.cluster import ClusterSpec, LocalCluster, RankSpec

FAULTS = (("expert", "stop"), ("expert", "kill"), ("attention", "stop"), ("attention", "kill"))


def start_cluster(mode: str, plane: str, out: io.TextIOBase) -> LocalCluster:
    spec = ClusterSpec(
        model="tiny",
        attention=2,
        experts=2,
        mode=mode,
        port=0,
        attention_ranks=[RankSpec(extra_args=["--data-plane", plane]) for _ in range(2)],
    )
    cluster = LocalCluster(spec, out=out)  # type: ignore[arg-type]
    cluster.start()
    return cluster


def child(cluster: LocalCluster, name: str) -> ChildProcess:
    return next(c for c in cluster.children if c.name == name)


async def serving_again(client: AsapClient, kind: str, rank: int, timeout_s: float = 60.0) -> float:
    """Seconds until the rank is taken back: an attention rank answers a call itself; with an expert
    rank (needed by every call) calls succeed on every attention rank."""
    started = time.monotonic()
    rng = random.Random(7)
    answered: set[int] = set()
    while time.monotonic() - started < timeout_s:
        call = Call(start=time.monotonic())
        await one_call(client, prompt(rng), 10.0, call)
        if call.status == OK:
            answered.add(call.rank)
            if (kind == "attention" and call.rank == rank) or (kind == "expert" and answered >= {0, 1}):
                return time.monotonic() - started
        else:
            answered.clear()
        await asyncio.sleep(0.05)
    return float("inf")


async def one_fault(
    cluster: LocalCluster, client: AsapClient, kind: str, how: str, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"{kind}-1"
    load = Load()
    done = False
    runner = asyncio.create_task(
        open_loop(
            client,
            rate,
            lambda: done,
            prompt=prompt,
            deadline_s=args.deadline_s,
            seed=hash(name + how) % 1000,
            load=load,
        )
    )
    before_from = time.monotonic()
    await asyncio.sleep(args.pre_s)
    target = child(cluster, name)
    fault_at = time.monotonic()
    target.send(signal.SIGSTOP if how == "stop" else signal.SIGKILL)
    await asyncio.sleep(args.hold_s)
    if how == "stop":
        target.send(signal.SIGCONT)
    else:
        await asyncio.to_thread(target.proc.wait, 10)
        await asyncio.to_thread(cluster.restart, name)
    back_at = time.monotonic()
    rejoin_s = await serving_again(client, kind, 1)
    settled_at = time.monotonic()
    await asyncio.sleep(args.post_s)
    done = True
    await runner
    figures = summarize(load, fault_at=fault_at, before_from=before_from, settled_at=settled_at)
    crashed = [c.name for c in cluster.children if c.proc.poll() is not None]
    return {
        "rank": name,
        "fault": "SIGKILL + restart" if how == "kill" else "SIGSTOP + SIGCONT",
        "rate_rps": round(rate, 2),
        **figures.as_dict(),
        "rejoin_s": round(rejoin_s, 2),
        "outage_s": round(back_at - fault_at, 2),
        "crashed": crashed,
        "failures": sorted({c.message for c in load.calls if c.status != OK})[:5],
        "failures_after_rejoin": sorted(
            {
                f"{c.start - settled_at:+.2f}s {c.message}"
                for c in load.calls
                if c.status != OK and c.start >= settled_at
            }
        )[:5],
    }


async def run_cluster(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    assert cluster.address is not None
    async with AsapClient(cluster.address, timeout_s=args.deadline_s, retries=0) as client:
        await warm_up(client)
        cap = await capacity(client, args.capacity_s)
        rate = max(0.5, args.load * cap)
        results = []
        for kind, how in FAULTS:
            if (kind, how) not in args.faults:
                continue
            result = await one_fault(cluster, client, kind, how, rate, args)
            print(json.dumps(result), flush=True)
            results.append(result)
        return {"capacity_rps": round(cap, 2), "faults": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--planes", default="auto,grpc", help="attention ranks' --data-plane values")
    parser.add_argument("--faults", default=",".join(f"{k}:{h}" for k, h in FAULTS), help="KIND:HOW list")
    parser.add_argument("--load", type=float, default=0.5, help="fraction of the measured capacity")
    parser.add_argument("--capacity-s", type=float, default=8.0)
    parser.add_argument("--pre-s", type=float, default=4.0, help="load before the fault")
    parser.add_argument("--hold-s", type=float, default=6.0, help="how long the rank stays stopped/dead")
    parser.add_argument("--post-s", type=float, default=6.0, help="load after the rank is back")
    parser.add_argument("--deadline-s", type=float, default=30.0, help="every call's deadline")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--log", default=os.devnull, help="the children's output goes here")
    args = parser.parse_args()
    args.faults = {tuple(f.split(":")) for f in args.faults.split(",")}
    report: dict[str, Any] = {"host_cpus": os.cpu_count(), "load_fraction": args.load, "runs": {}}
    with open(args.log, "a") as log:
        for mode in args.modes.split(","):
            for plane in args.planes.split(","):
                cluster = start_cluster(mode, plane, log)  # type: ignore[arg-type]
                try:
                    key = f"{mode}/{plane}"
                    report["runs"][key] = asyncio.run(run_cluster(cluster, args))
                    report["runs"][key]["data_planes"] = plane
                finally:
                    cluster.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
