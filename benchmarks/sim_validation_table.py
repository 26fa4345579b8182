"""The simulator against the multi-process emulated cluster: TTFT p50 / p90 per rate and mode, and each
mode's max SLO-compliant rate, as a markdown table with the ratios and whether each is within a tolerance.

``python benchmarks/sim_validation_table.py SIM.json [CLUSTER.json] [--tolerance 0.15]``; the cluster file
defaults to ``benchmarks/results/headline_8x4.json`` (the 8 + 4 emulated cluster). Rates the simulator did
not run are skipped; the cluster's max SLO-compliant rate is over its own (wider) sweep.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def _rows(document: dict[str, Any]) -> dict[str, dict[float, dict[str, Any]]]:
    return {
        mode: {float(r["rate_rps"]): r for r in sweep["results"]} for mode, sweep in document["modes"].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sim")
    parser.add_argument("cluster", nargs="?", default="benchmarks/results/headline_8x4.json")
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args()
    with open(args.sim) as f:
        sim = json.load(f)
    with open(args.cluster) as f:
        cluster = json.load(f)
    sim_rows, cluster_rows = _rows(sim), _rows(cluster)
    tol = args.tolerance
    print(
        "| mode | rate | cluster p50 | sim p50 | sim / cluster | cluster p90 | sim p90 | sim / cluster "
        "| cluster in SLO | sim in SLO |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    within = total = 0
    for mode, rates in sim_rows.items():
        for rate, row in sorted(rates.items()):
            other = cluster_rows.get(mode, {}).get(rate)
            if other is None:
                continue
            cells = []
            for q in ("p50", "p90"):
                a, b = other["ttft_ms"][q], row["ttft_ms"][q]
                ratio = b / a
                ok = abs(ratio - 1) <= tol
                within, total = within + ok, total + 1
                cells += [f"{a:.0f}", f"{b:.0f}", f"{ratio:.2f}" + ("" if ok else " ✗")]
            print(
                f"| {mode} | {rate:g} | {' | '.join(cells)} | {other['slo_attainment']:.1%} "
                f"| {row['slo_attainment']:.1%} |"
            )
    print(f"\n{within} of {total} TTFT ratios within {tol:.0%} (✗: outside).")
    for mode in sim_rows:
        print(
            f"max SLO-compliant RPS, {mode}: cluster {cluster['modes'][mode]['max_slo_rps']}, "
            f"simulated {sim['modes'][mode]['max_slo_rps']} (over the simulated rates)"
        )


if __name__ == "__main__":
    main()
