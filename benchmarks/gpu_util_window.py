"""GPU utilisation while a benchmarked cluster served: the mean of ``nvidia-smi`` samples between the
scheduler's start and its shutdown (from the cluster log), not over start-up and model loading too.

    python3 benchmarks/gpu_util_window.py UTIL.csv CLUSTER.log    # UTIL.csv: timestamp, utilization.gpu
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

_LOG = re.compile(
    r"\[scheduler\] (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) scheduler INFO .*?(core started|shutdown requested)"
)


def main() -> None:
    util_csv, log = Path(sys.argv[1]), Path(sys.argv[2])
    marks = {m[2]: datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f") for m in _LOG.finditer(log.read_text())}
    start, end = marks["core started"], marks["shutdown requested"]
    samples = []
    for line in util_csv.read_text().splitlines():
        stamp, _, value = line.partition(",")
        try:
            when = datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f")
            samples.append((when, float(value)))
        except ValueError:
            continue
    inside = [v for t, v in samples if start <= t <= end]
    result = {
        "window_s": (end - start).total_seconds(),
        "samples": len(inside),
        "util_mean_pct": statistics.fmean(inside) if inside else None,
        "util_p50_pct": statistics.median(inside) if inside else None,
        "util_mean_whole_run_pct": statistics.fmean(v for _, v in samples) if samples else None,
    }
    print(json.dumps(result))
    util_csv.with_suffix(".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
