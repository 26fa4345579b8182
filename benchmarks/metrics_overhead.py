"""What serving metrics costs: TTFT of an emulated cluster with metrics off vs on, and the per-call
cost of the recorders the hot paths update.

Part 1, the recorders: ns per call of ``Distribution.observe`` (what an exchange and a request record),
``BusyClock.begin``+``end`` (what a batch records), against prometheus_client's own
``Histogram.observe`` (which takes a lock) and an empty loop.

Part 2, the cluster: a local cluster (``asap.cluster.LocalCluster``, emulated compute) started once per
setting, the same closed-loop load through the SDK (``--concurrency`` workers, ``--requests`` prompts of
``--tokens`` tokens after a warm-up). "on" is ``asap up --metrics-port 0`` plus a scraper reading every
service's ``/metrics`` each ``--scrape-interval`` seconds (Prometheus' default is 15 s; 1 s is harsher).
Settings alternate for ``--rounds`` rounds, in turn off-first and on-first (off, on, on, off, ...), so
drift on a shared host and the order itself hit both.

    python benchmarks/metrics_overhead.py [--requests 200] [--concurrency 4] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import threading
import timeit
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry, Histogram

from asap.bench.closed_loop import closed_loop
from asap.cluster import ClusterSpec, LocalCluster
from asap.metrics import EXCHANGE_BUCKETS_S, BusyClock, Distribution


def recorder_costs(number: int = 200_000) -> dict[str, float]:
    """ns per call, best of 5."""
    dist = Distribution(EXCHANGE_BUCKETS_S)
    busy = BusyClock()
    prom = Histogram("x_seconds", "x", buckets=EXCHANGE_BUCKETS_S, registry=CollectorRegistry())

    def best(stmt: Any) -> float:
        return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e9

    def pair() -> None:
        busy.begin()
        busy.end()

    base = best(lambda: None)
    return {
        "empty call": round(base, 1),
        "Distribution.observe": round(best(lambda: dist.observe(0.0007)), 1),
        "BusyClock.begin+end": round(best(pair), 1),
        "prometheus_client Histogram.observe": round(best(lambda: prom.observe(0.0007)), 1),
    }


class Scraper:
    """Reads every URL each ``interval_s`` on a thread until stopped; counts the scrapes."""

    def __init__(self, urls: list[str], interval_s: float) -> None:
        self.urls, self.interval_s, self.scrapes = urls, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for url in self.urls:
                with urllib.request.urlopen(url, timeout=10) as response:
                    response.read()
                self.scrapes += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(args: argparse.Namespace, metrics: bool) -> dict[str, Any]:
    spec = ClusterSpec(
        model=args.model, attention=args.attention, experts=args.experts, port=0, threads=1,
        compute=args.compute, min_batch_tokens=0, metrics_port=0 if metrics else None,
    )  # fmt: skip
    log = io.StringIO()
    cluster = LocalCluster(spec, out=log)
    scrapes = 0
    try:
        address = cluster.start()
        if metrics and args.scrape_interval > 0:
            with Scraper(list(cluster.metrics_urls().values()), args.scrape_interval) as scraper:
                seconds, ttfts = asyncio.run(
                    closed_loop(
                        address, args.requests, args.concurrency, args.tokens, warmup=2 * args.concurrency
                    )
                )
            scrapes = scraper.scrapes
        else:
            seconds, ttfts = asyncio.run(
                closed_loop(
                    address, args.requests, args.concurrency, args.tokens, warmup=2 * args.concurrency
                )
            )
    except BaseException:
        print(log.getvalue()[-4000:], file=sys.stderr)
        raise
    finally:
        cluster.stop()
    ttfts.sort()
    return {
        "metrics": "on" if metrics else "off",
        "requests": len(ttfts),
        "throughput_rps": round(len(ttfts) / seconds, 2),
        "ttft_ms_mean": round(statistics.fmean(ttfts), 2),
        "ttft_ms_p50": round(ttfts[len(ttfts) // 2], 2),
        "ttft_ms_p90": round(ttfts[int(len(ttfts) * 0.9)], 2),
        "scrapes": scrapes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--compute", default="emulated:h200")
    parser.add_argument("--attention", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        help="seconds between scrapes; 0: serve metrics, scrape none",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    costs = recorder_costs()
    print(json.dumps({"recorder_ns_per_call": costs}), flush=True)
    rows = []
    for round_ in range(args.rounds):
        for metrics in (False, True) if round_ % 2 == 0 else (True, False):
            row = measure(args, metrics) | {"round": round_}
            rows.append(row)
            print(json.dumps(row), flush=True)
    medians = {
        setting: {
            key: statistics.median(r[key] for r in rows if r["metrics"] == setting)
            for key in ("throughput_rps", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p90")
        }
        for setting in ("off", "on")
    }
    print(json.dumps({"medians": medians}), flush=True)
    if args.json:
        meta = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(
            json.dumps(
                {"meta": meta, "recorder_ns_per_call": costs, "rows": rows, "medians": medians}, indent=2
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
