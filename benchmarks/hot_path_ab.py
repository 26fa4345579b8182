"""The attention rank's hot path against its event-loop path, interleaved request by request (so both see
the same host load): an in-process emulated attention rank on the fast plane and emulated expert
processes, the 16-layer Qwen3-30B-A3B-shaped model, 128-token prompts one at a time.

    python benchmarks/hot_path_ab.py --experts 1 --requests 40

Prints, per path, the median and lower quartile batch time and the attention process's CPU time per
batch (``time.process_time``: every thread of the process, the poll thread included).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._fast_experts import fast_experts


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--compute", default="emulated:h200")
    args = parser.parse_args()
    async with fast_experts(args.experts, args.compute) as (executor, _procs):
        wall: dict[str, list[float]] = {"loop": [], "hot": []}
        cpu: dict[str, list[float]] = {"loop": [], "hot": []}
        for i in range(args.requests + 5):
            for path in ("loop", "hot"):
                executor.hot_path = path == "hot"
                t, c = time.perf_counter(), time.process_time()
                await executor.run_batch([executor.make_prompt("p", list(range(1, 129)))])
                if i >= 5:
                    wall[path].append(time.perf_counter() - t)
                    cpu[path].append(time.process_time() - c)
        for path, times in wall.items():
            print(
                f"{path:5s} median {statistics.median(times) * 1e3:7.2f} ms  "
                f"p25 {sorted(times)[len(times) // 4] * 1e3:7.2f} ms  "
                f"cpu {statistics.median(cpu[path]) * 1e3:6.2f} ms/batch"
            )
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    asyncio.run(main())
