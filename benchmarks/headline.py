"""The headline comparison: async vs sync vs sync-chunked on an emulated H200-class cluster.

Runs ``asap bench --compare`` (one fresh local cluster per mode, the identical request sequence from the
Azure LLM conversation trace) and samples the host CPU meanwhile, so the report can say whether the
host, rather than the emulated devices, limited the run. Writes OUT/headline.json (bench JSON plus a
"host_cpu" section) and OUT/headline.png.

    python benchmarks/headline.py --out benchmarks/results [--sweep ...] [--requests N] [bench flags...]

Extra arguments after ``--`` go to ``asap bench`` unchanged (e.g. ``-- --optimizations none``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asap.cli import main as asap_main

DEFAULTS = {
    "modes": "async,sync-chunked,sync",
    "model": str(ROOT / "benchmarks" / "models" / "qwen3-30b-a3b-8l"),
    "compute": "emulated:h200/50",
    "attention": "8",
    "experts": "4",
    "trace": str(ROOT.parent / "shared" / "workloads" / "azure_llm_conv_2023.csv"),
    "slo_ttft_ms": "3000",
    "sweep": "8,16,24,32,40,48",
    "requests": "150",
}


def cpu_busy_sampler(samples: list[float], stop: threading.Event, interval_s: float = 1.0) -> None:
    """Host CPU busy fraction per interval from /proc/stat (all cores)."""

    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = read()
    while not stop.wait(interval_s):
        total1, idle1 = read()
        if total1 > total0:
            samples.append(1.0 - (idle1 - idle0) / (total1 - total0))
        total0, idle0 = total1, idle1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="headline")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", default=value)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out / f"{args.name}.json", out / f"{args.name}.png"
    argv = [
        "bench", "--compare", args.modes, "--model", args.model, "--compute", args.compute,
        "--attention", args.attention, "--experts", args.experts, "--trace", args.trace,
        "--slo-ttft-ms", args.slo_ttft_ms, "--sweep", args.sweep, "--requests", args.requests,
        "--json", str(json_path), "--plot", str(plot_path), "--cluster-log", str(out / f"{args.name}.log"),
        *extra,
    ]  # fmt: skip
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=cpu_busy_sampler, args=(samples, stop), daemon=True)
    sampler.start()
    started = time.time()
    code = asap_main(argv)
    stop.set()
    sampler.join()
    document = json.loads(json_path.read_text())
    document["host_cpu"] = {
        "cores": __import__("os").cpu_count(),
        "busy_mean": statistics.fmean(samples) if samples else None,
        "busy_p90": statistics.quantiles(samples, n=10)[-1] if len(samples) >= 10 else None,
        "seconds": time.time() - started,
        "note": "whole host, all processes; sampled once per second during the run",
    }
    document["command"] = " ".join(["python", "benchmarks/headline.py", *sys.argv[1:]])
    json_path.write_text(json.dumps(document, indent=1))
    print(f"host CPU busy: mean {document['host_cpu']['busy_mean']:.0%}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
