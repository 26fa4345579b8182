"""Ablation of ASAP's four optimizations on the headline configuration.

Runs ``asap bench --compare async`` once per optimization set (all, each one removed, none) with the
headline's cluster, workload and SLO, on the same request sequence, and prints one table. The sync
baselines of the same configuration come from the headline run (benchmarks/headline.py).

    python benchmarks/ablation.py --out benchmarks/results --sweep 4,20 [--compute emulated:h200/50 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asap.cli import main as asap_main
from asap.optimizations import OPTIMIZATIONS

VARIANTS = {
    "all": "all",
    **{f"-{name}": ",".join(o for o in OPTIMIZATIONS if o != name) for name in OPTIMIZATIONS},
    "none": "none",
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model", default=str(ROOT / "benchmarks" / "models" / "qwen3-30b-a3b-8l"))
    parser.add_argument("--compute", default="emulated:h200/50")
    parser.add_argument("--attention", default="4")
    parser.add_argument("--experts", default="4")
    parser.add_argument(
        "--trace", default=str(ROOT.parent / "shared" / "workloads" / "azure_llm_conv_2023.csv")
    )
    parser.add_argument("--slo-ttft-ms", default="3000")
    parser.add_argument("--sweep", default="4,20")
    parser.add_argument("--requests", default="150")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, object] = {}
    for label in args.variants.split(","):
        path = out / f"ablation_{label.strip('-') if label != 'all' else 'all'}.json"
        argv = [
            "bench", "--compare", "async", "--optimizations", VARIANTS[label], "--model", args.model,
            "--compute", args.compute, "--attention", args.attention, "--experts", args.experts,
            "--trace", args.trace, "--slo-ttft-ms", args.slo_ttft_ms, "--sweep", args.sweep,
            "--requests", args.requests, "--json", str(path), "--no-progress",
            "--cluster-log", str(out / "ablation.log"),
        ]  # fmt: skip
        print(f"== {label}: {VARIANTS[label]}", flush=True)
        asap_main(argv)
        document = json.loads(path.read_text())
        table[label] = document["modes"]["async"]
    summary = out / "ablation.json"
    summary.write_text(json.dumps({"variants": VARIANTS, "results": table, "argv": sys.argv[1:]}, indent=1))
    print(f"{'variant':<16} {'rate':>5} {'rps':>6} {'mean':>8} {'p90':>8} {'in SLO':>7}")
    for label, run in table.items():
        for r in run["results"]:  # type: ignore[index]
            print(
                f"{label:<16} {r['rate_rps']:>5.0f} {r['throughput_rps']:>6.2f} {r['ttft_ms']['mean']:>8.1f} "
                f"{r['ttft_ms']['p90']:>8.1f} {r['slo_attainment']:>7.1%}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
