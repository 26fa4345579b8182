"""Where the host CPU of one MoE layer goes on the emulated fast plane's hot path: ``cProfile`` (thread CPU
time) of the attention compute thread and of the expert process's poll thread, over the measured prompts
of ``layer_hops.py``'s setting (in-process attention rank, expert processes, 16-layer model, 128-token
prompts, undilated ``emulated:h200``).

Why a profile and not a sampler: py-spy is not installed here. A deterministic profiler inflates small
calls (its own cost per call is ~1 µs), so read the shares and the call counts per layer, not the
absolute times. The expert processes are started through a boot line that runs their poll threads (and
compute threads) under the profiler and write the stats once the harness touches a file.

    python benchmarks/layer_profile.py --experts 1 --requests 20 --top 25 [--save DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.model.config import load_config
from attention_svc import direct_runner
from benchmarks._fast_experts import MODEL, fast_experts

BOOT = """
import cProfile, os, runpy, sys, threading, time
from asap.dataplane import poller
out, flag = os.environ["ASAP_PROF_OUT"], os.environ["ASAP_PROF_FLAG"]
run = poller.PollThread._run
def _run(self):
    prof = cProfile.Profile(time.thread_time)
    stop = threading.Event()
    def watch():
        while not os.path.exists(flag):
            time.sleep(0.05)
        stop.set()
    threading.Thread(target=watch, daemon=True).start()
    idle = self._backoff.idle
    def idle_(rings, bells):
        idle(rings, bells)
        if stop.is_set() and not getattr(self, "_dumped", False):
            self._dumped = True
            prof.disable()
            prof.dump_stats(f"{out}.{self.name}.{os.getpid()}")
    self._backoff.idle = idle_
    prof.enable()
    run(self)
poller.PollThread._run = _run
sys.argv = ["expert_svc", *sys.argv[1:]]
runpy.run_module("expert_svc", run_name="__main__", alter_sys=True)
"""


def _top(stats: pstats.Stats, top: int, layers: int) -> str:
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    total = stats.total_tt  # type: ignore[attr-defined]
    return f"total {total / layers * 1e6:.0f} µs of profiled CPU per layer\n" + buf.getvalue()


def _collect(flag: str, tmp: str, experts: int) -> None:
    """Ask the expert processes for their profiles and wait (30 s at most) until each wrote one."""
    Path(flag).touch()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(f.startswith("expert.prof.") for f in os.listdir(tmp)) >= experts:
            break
        time.sleep(0.1)
    time.sleep(0.5)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--compute", default="emulated:h200")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--side", choices=("attention", "expert", "both"), default="both")
    parser.add_argument("--save", help="copy the profiles (pstats files) into this folder")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="layer_profile_")
    flag, out = os.path.join(tmp, "done"), os.path.join(tmp, "expert.prof")
    os.environ["ASAP_PROF_FLAG"], os.environ["ASAP_PROF_OUT"] = flag, out
    prof = cProfile.Profile(time.thread_time)
    on = [False]
    drive = direct_runner.DirectRunner._drive

    def drive_(self: Any) -> None:
        if on[0]:
            prof.enable()
        try:
            drive(self)
        finally:
            if on[0]:
                prof.disable()

    direct_runner.DirectRunner._drive = drive_  # type: ignore[method-assign]
    async with fast_experts(args.experts, args.compute, entry=("-c", BOOT)) as (executor, _procs):
        for i in range(args.warmup + args.requests):
            on[0] = args.side != "expert" and i >= args.warmup
            await executor.run_batch([executor.make_prompt("p", list(range(1, args.tokens + 1)))])
        await asyncio.to_thread(_collect, flag, tmp, args.experts)
    layers = args.requests * len(load_config(MODEL).moe_layer_ids)
    print(f"experts {args.experts}, {args.requests} prompts of {args.tokens} tokens, {args.compute}")
    if args.side != "expert":
        print("=== attention compute thread (measured prompts only)")
        print(_top(pstats.Stats(prof), args.top, layers))
    if args.side != "attention":
        for name in sorted(os.listdir(tmp)):
            if name.startswith("expert.prof."):
                print(f"=== expert {name.removeprefix('expert.prof.')} thread (warm-up included), per layer")
                print(
                    _top(
                        pstats.Stats(os.path.join(tmp, name)),
                        args.top,
                        layers * (args.requests + args.warmup) // args.requests,
                    )
                )
    print(f"load average {os.getloadavg()}")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        prof.dump_stats(os.path.join(args.save, "attention.prof"))
        for name in os.listdir(tmp):
            if name.startswith("expert.prof."):
                shutil.copy(os.path.join(tmp, name), args.save)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
