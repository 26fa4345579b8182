"""Run ``asap simulate ARGS`` in this process, for the benchmark scripts that instrument it
(``sim_sample_profile.py``, ``sim_handle_census.py``): their report runs however the simulation ends, and
the simulation's exit status is kept."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable, Sequence


def run_simulate(args: Sequence[str], report: Callable[[], None]) -> int:
    """``asap simulate *args`` as ``python -m asap`` would run it, then ``report()``; returns its exit status."""
    sys.argv = ["asap", "simulate", *args]
    try:
        runpy.run_module("asap", run_name="__main__")
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        report()
    return 0
