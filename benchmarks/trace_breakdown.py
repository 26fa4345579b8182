"""Where TTFT goes, per mode, on the headline configuration: a traced emulated cluster per mode, the same
open-loop request sequence at one rate, and the tracing summary (queue / attention / transfer / expert
queue / expert compute / barrier / other).

    python benchmarks/trace_breakdown.py --out benchmarks/results --rate 12 --requests 80
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asap.bench.sweep import BenchConfig, bench_target
from asap.bench.workload import Trace, WorkloadSpec
from asap.cluster import ClusterSpec, LocalCluster
from asap.telemetry.otlpjson import load_spans
from asap.telemetry.summary import summarize


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--modes", default="async,sync-chunked,sync")
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "models" / "qwen3-30b-a3b-8l"))
    parser.add_argument("--compute", default="emulated:h200/50")
    parser.add_argument("--attention", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument(
        "--trace-csv", default=str(ROOT.parent / "shared" / "workloads" / "azure_llm_conv_2023.csv")
    )
    parser.add_argument("--rate", type=float, default=12.0)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"argv": sys.argv[1:]}
    for mode in args.modes.split(","):
        spans_file = Path(tempfile.mkdtemp()) / f"{mode}.jsonl"
        spec = ClusterSpec(
            model=args.model, attention=args.attention, experts=args.experts, mode=mode, compute=args.compute,
            dtype="bfloat16", port=0, trace=str(spans_file),
        )  # fmt: skip
        config = BenchConfig(
            workload=WorkloadSpec(
                arrival="trace", trace=Trace.load(args.trace_csv), requests=args.requests, warmup=8
            ),
            rates=[args.rate],
            slo_ttft_ms=args.slo_ttft_ms,
            progress=False,
        )
        with open(out / f"trace_breakdown_{mode}.log", "w") as log:
            cluster = LocalCluster(spec, out=log)
            address = cluster.start()
            try:
                sweep = asyncio.run(bench_target(address, config, mode, compute=args.compute))
            finally:
                cluster.stop()
        summary = summarize(load_spans(spans_file))
        per_mode = summary.modes
        report[mode] = {"bench": sweep.to_json(), "breakdown": per_mode}
        print(f"== {mode}: {json.dumps(per_mode, default=str)[:600]}", flush=True)
    (out / "trace_breakdown.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
