"""``asap simulate ARGS`` under a sampling profiler (SIGPROF on process CPU time): self and inclusive
shares per function, to stderr.

cProfile (``asap simulate --profile``) charges its own overhead to every call, which inflates the many
small asyncio and service calls of a simulation 3-4x against the numpy work; sampling does not. Time
spent in C (numpy, torch) is attributed to the Python function that called it.
    python benchmarks/sim_sample_profile.py --compare async --model ... [simulate flags]
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from types import FrameType

from _simulate import run_simulate  # a sibling: these scripts run as `python benchmarks/NAME.py`

INTERVAL_S = 0.001

self_counts: collections.Counter[tuple[str, str]] = collections.Counter()
inclusive_counts: collections.Counter[tuple[str, str]] = collections.Counter()
samples = [0]


def _sample(signum: int, frame: FrameType | None) -> None:
    samples[0] += 1
    if frame is None:
        return
    self_counts[(frame.f_code.co_filename, frame.f_code.co_name)] += 1
    seen = set()
    f: FrameType | None = frame
    while f is not None:
        key = (f.f_code.co_filename, f.f_code.co_name)
        if key not in seen:
            seen.add(key)
            inclusive_counts[key] += 1
        f = f.f_back


def _short(path: str) -> str:
    for prefix in (os.getcwd() + "/", sys.prefix + "/lib/", os.path.dirname(os.__file__) + "/"):
        path = path.replace(prefix, "")
    return path


def _report(top: int = int(os.environ.get("SIM_PROFILE_TOP", "45"))) -> None:
    """The ``top`` functions by share (``SIM_PROFILE_TOP``, default 45) of each list."""
    n = max(samples[0], 1)
    print(f"samples {samples[0]} (every {INTERVAL_S * 1e3:g} ms of CPU)", file=sys.stderr)
    for title, counts in (("self", self_counts), ("inclusive", inclusive_counts)):
        print(f"== {title}", file=sys.stderr)
        for (path, name), count in counts.most_common(top):
            print(f"{100 * count / n:5.1f}% {_short(path)}:{name}", file=sys.stderr)


def main() -> int:
    signal.signal(signal.SIGPROF, _sample)
    signal.setitimer(signal.ITIMER_PROF, INTERVAL_S, INTERVAL_S)

    def stop_and_report() -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        _report()

    return run_simulate(sys.argv[1:], stop_and_report)


if __name__ == "__main__":
    raise SystemExit(main())
