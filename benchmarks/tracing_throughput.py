"""Throughput of a local cluster with tracing off vs on, in one run.

Starts a local cluster (``asap.cluster.LocalCluster``, the tiny model by default) once per setting and
sends the same closed-loop load through the SDK: ``--concurrency`` workers, each sending its next
request as soon as the previous one is answered, ``--requests`` in all, prompts of ``--tokens`` tokens.
"on" is what ``asap up --trace FILE`` does: every service exports over OTLP/gRPC to an in-process
collector writing JSON lines. Settings alternate (off, on, off, on, ...) for ``--rounds`` rounds so slow
drift on a shared host hits both; a warm-up of ``--concurrency`` requests precedes each measurement.

Prints requests/s and mean/p50/p90 TTFT per round and the on/off ratio of the medians; ``--json`` writes
them.

    python benchmarks/tracing_throughput.py [--model tiny] [--requests 300] [--concurrency 8] [--rounds 2]
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
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.bench.closed_loop import closed_loop
from asap.cluster import ClusterSpec, LocalCluster
from asap.telemetry.otlpjson import load_spans


def _measure(args: argparse.Namespace, trace: Path | None) -> dict[str, Any]:
    spec = ClusterSpec(
        model=args.model, attention=args.attention, experts=args.experts, port=0, threads=args.threads,
        trace=str(trace) if trace is not None else None,
    )  # fmt: skip
    log = io.StringIO()
    cluster = LocalCluster(spec, out=log)
    try:
        address = cluster.start()
        seconds, ttfts = asyncio.run(
            closed_loop(address, args.requests, args.concurrency, args.tokens, warmup=args.concurrency)
        )
    except BaseException:
        print(log.getvalue()[-4000:], file=sys.stderr)
        raise
    finally:
        cluster.stop()
    ttfts.sort()
    row: dict[str, Any] = {
        "tracing": "on" if trace is not None else "off",
        "requests": len(ttfts),
        "seconds": round(seconds, 3),
        "throughput_rps": round(len(ttfts) / seconds, 2),
        "ttft_ms_mean": round(statistics.fmean(ttfts), 2),
        "ttft_ms_p50": round(ttfts[len(ttfts) // 2], 2),
        "ttft_ms_p90": round(ttfts[int(len(ttfts) * 0.9)], 2),
    }
    if trace is not None:
        row["spans"] = len(load_spans(trace))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--attention", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for tracing in (False, True):
                trace = Path(tmp) / f"round{round_}.jsonl" if tracing else None
                row = _measure(args, trace) | {"round": round_}
                rows.append(row)
                print(json.dumps(row), flush=True)
    medians = {
        setting: statistics.median(r["throughput_rps"] for r in rows if r["tracing"] == setting)
        for setting in ("off", "on")
    }
    ratio = medians["on"] / medians["off"]
    print(f"median throughput: off {medians['off']:.2f} rps, on {medians['on']:.2f} rps, on/off {ratio:.3f}")
    if args.json:
        meta = {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "args": vars(args) | {"json": str(args.json)},
        }
        args.json.write_text(
            json.dumps({"meta": meta, "rows": rows, "median_rps": medians, "on_off": ratio}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
