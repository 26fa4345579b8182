"""The two front doors at the same load: gRPC (``AsapClient``) vs OpenAI HTTP (``POST /v1/completions``).

One local cluster (emulated compute, so the devices cost nothing of this machine's CPU) serves both doors
at once; at each rate the identical request sequence goes through gRPC, then HTTP, then HTTP, then gRPC
(the order cancels drift), via ``asap bench``'s own runner. A door's overhead is what its client sees
beyond what the scheduler measured: client TTFT (scheduled send -> answer) minus server TTFT (arrival at
the scheduler -> first token), request by request, pooled over both runs of a door.

    PYTHONPATH=$PWD python benchmarks/front_doors.py --rates 10,40,80 --requests 150 \\
        --json benchmarks/results/front_doors.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from asap.bench.http_client import OpenAIHttpClient
from asap.bench.runner import RequestRecord, RunOptions, run_requests
from asap.bench.workload import BenchRequest, LengthSpec, WorkloadSpec, build_requests
from asap.client import AsapClient
from asap.cluster import ClusterSpec, LocalCluster


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = np.asarray(values)
    return {
        "mean": float(ordered.mean()),
        **{f"p{q}": float(np.percentile(ordered, q)) for q in (50, 90, 99)},
    }


async def _run(protocol: str, target: str, requests: list[BenchRequest], vocab: int) -> list[RequestRecord]:
    options = RunOptions(seed=0, vocab_size=vocab, timeout_s=60.0)
    if protocol == "http":
        async with OpenAIHttpClient(target) as http:
            await http.cluster_state()  # learns the model name, as the benchmark does
            return await run_requests(http, requests, options)
    async with AsapClient(target, retries=0) as client:
        return await run_requests(client, requests, options)


def _summary(records: list[RequestRecord]) -> dict[str, Any]:
    """Client TTFT, server TTFT and per-request overhead (client minus server) of the measured requests."""
    done = [r for r in records if r.ok and not r.warmup and r.server_ttft_ms is not None]
    return {
        "completed": len(done),
        "failed": sum(1 for r in records if not r.ok and not r.warmup),
        "failures": dict(Counter(r.status for r in records if not r.ok and not r.warmup)),
        "client_ttft_ms": _percentiles([r.ttft_ms for r in done]),
        "server_ttft_ms": _percentiles([r.server_ttft_ms or 0.0 for r in done]),
        "overhead_ms": _percentiles([r.ttft_ms - (r.server_ttft_ms or 0.0) for r in done]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,40,80")
    parser.add_argument("--requests", type=int, default=150, help="measured requests per run")
    parser.add_argument("--lengths", default="uniform:16,512")
    parser.add_argument("--compute", default="emulated:h200")
    parser.add_argument("--attention", type=int, default=2)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = ClusterSpec(
        compute=args.compute, attention=args.attention, experts=args.experts, port=0, http_port=0
    )
    rates = [float(r) for r in args.rates.split(",")]
    table: dict[str, dict[str, dict[str, float]]] = {}
    with open("/tmp/front_doors_cluster.log", "w") as log, LocalCluster(spec, out=log) as cluster:
        targets = {"grpc": cluster.address, "http": cluster.http_url}
        vocab = 256  # the tiny model's byte vocabulary (ids below it are valid for every model here)
        for rate in rates:
            workload = WorkloadSpec(
                lengths=LengthSpec.parse(args.lengths), requests=args.requests, warmup=10, seed=int(rate)
            )
            requests = build_requests(workload, rate, max_prompt_tokens=4096)
            runs: dict[str, list[RequestRecord]] = {"grpc": [], "http": []}
            for protocol in ("grpc", "http", "http", "grpc"):
                runs[protocol] += asyncio.run(_run(protocol, str(targets[protocol]), requests, vocab))
            row = {protocol: _summary(records) for protocol, records in runs.items()}
            table[f"{rate:g}"] = row
            grpc, http = row["grpc"], row["http"]
            print(
                f"{rate:5g} rps | client TTFT p50 grpc {grpc['client_ttft_ms']['p50']:7.2f} http "
                f"{http['client_ttft_ms']['p50']:7.2f} ms (x{http['client_ttft_ms']['p50'] / grpc['client_ttft_ms']['p50']:.2f})"
                f" | overhead p50 grpc {grpc['overhead_ms']['p50']:5.2f} http {http['overhead_ms']['p50']:5.2f} ms"
                f" (x{http['overhead_ms']['p50'] / grpc['overhead_ms']['p50']:.2f}), p99 grpc "
                f"{grpc['overhead_ms']['p99']:5.2f} http {http['overhead_ms']['p99']:5.2f} ms | failed "
                f"{grpc['failed']}/{http['failed']}",
                flush=True,
            )
    if args.json:
        document = {"spec": {"compute": args.compute, "attention": args.attention, "experts": args.experts,
                             "lengths": args.lengths, "requests": args.requests}, "rates": table}  # fmt: skip
        Path(args.json).write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
