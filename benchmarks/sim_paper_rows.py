"""Markdown rows of the paper-table runs (``asap simulate --json``): one row per mode and rate, then the
sync TTFT breakdown per class when the run has one.

``python benchmarks/sim_paper_rows.py benchmarks/results/sim16h/*.json``: columns as the tables of
benchmarks/README.md ("The paper table, round 4"); CPU s is the simulating process's user time from the
``.log`` beside each JSON (``/usr/bin/time -v``, written by ``benchmarks/results/sim16h/run.sh``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


def _cpu_s(path: Path) -> str:
    log = path.with_suffix(".log")
    if not log.exists():
        return "-"
    found = re.search(r"User time \(seconds\): ([0-9.]+)", log.read_text())
    return f"{float(found.group(1)):.0f}" if found else "-"


def _label(document: dict[str, Any], mode: str) -> str:
    sim = document.get("simulation", {})
    model = str(document.get("config", {}).get("cluster", {}).get("model", ""))
    parts = [mode, sim.get("layout", "")]
    if mode != "async":
        parts.append(f"planner {sim.get('sync_planner', 'lpt')}")
    if sim.get("port_gbps"):
        parts.append(f"port {sim['port_gbps']:g} GB/s")
    parts.append(Path(model).name)  # deepseek-v3.2: sparse attention since round 4; -dense: dense MLA
    return ", ".join(p for p in parts if p)


def rows(path: Path) -> tuple[list[str], list[str]]:
    document = json.loads(path.read_text())
    table, breakdown = [], []
    for mode, entry in document["modes"].items():
        for r in entry["results"]:
            t = r["ttft_ms"]
            table.append(
                f"| {_label(document, mode)} | {r['rate_rps']:g} | `{r['sequence']}` | "
                f"{r['throughput_rps']:.2f} | {r['throughput_rps'] / r['rate_rps']:.2f} | {t['mean']:.0f} | "
                f"{t['p50']:.0f} | {t['p90']:.0f} | {t['p99']:.0f} | {r['queue_ms']['mean']:.0f} | "
                f"{r['slo_attainment']:.1%} | {_cpu_s(path)} | {path.name} |"
            )
        run = document.get("simulation", {}).get("runs", {}).get(mode, {})
        for name, c in run.get("ttft_breakdown", {}).get("classes", {}).items():
            rates = "/".join(f"{r['rate_rps']:g}" for r in entry["results"])
            breakdown.append(
                f"| {_label(document, mode)} | {rates} | {name} | {c['requests']} | {c['prompt_tokens_mean']} | "
                f"{c['ttft_ms_mean']:.0f} | {c['barrier_ms_mean']:.0f} | {c['barrier_share_mean']:.0%} | "
                f"{c['barrier_share_of_total']:.0%} | {c['queue_ms_mean']:.0f} | {c['queue_share_of_total']:.0%} |"
            )
    return table, breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path)
    args = parser.parse_args()
    tables, breakdowns = [], []
    for path in args.json:
        table, breakdown = rows(path)
        tables += table
        breakdowns += breakdown
    print(
        "| run | rate | sequence | completed rps | completed / offered | TTFT mean | p50 | p90 | p99 | queue mean | in SLO | CPU s | file |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(tables))
    if breakdowns:
        print()
        print(
            "| run | rate | class | requests | mean prompt | TTFT mean ms | barrier wait mean ms | barrier / TTFT (per request) | barrier / summed TTFT | queue mean ms | queue / summed TTFT |"
        )
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        print("\n".join(breakdowns))


if __name__ == "__main__":
    main()
