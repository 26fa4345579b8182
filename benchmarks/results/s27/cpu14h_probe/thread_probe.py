"""Where a 1+1 emulated cluster's threads run, instance by instance: the CPU cluster figure's slow mode.

Starts the same 1+1 fast-plane cluster as ``emulated_layer_cost.py`` (its ``_start`` and ``_ttfts``)
fresh ``--instances`` times; for each, after the warm-up, names every service thread (``py-spy dump``,
when ``--py-spy`` is given), then during the measured prompts samples each thread's state and last CPU
(``/proc/PID/task/TID/stat`` fields 3 and 39) and takes the run time, the run-queue wait and the
timeslices of each thread (``/proc/PID/task/TID/schedstat``) before and after. Prints per instance the
TTFT p50 and, per thread with more than 1% of the window's run time, its CPU share, its run-queue wait,
its share of samples on CPU 0, and for the two hot threads the share of samples where both were
runnable on one CPU. ``--period-ms 0`` takes only the schedstat figures (no sampling thread).

    PYTHONPATH=. python benchmarks/thread_probe.py --instances 6 --py-spy /tmp/pyspyvenv/bin/py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.model.config import load_config
from benchmarks.emulated_layer_cost import MODEL, _start, _ttfts

_THREAD = re.compile(r"^Thread (0x[0-9A-Fa-f]+|\d+) \((\w+)\): \"([^\"]*)\"")


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def _stat(pid: int, tid: int) -> tuple[str, str, int] | None:
    """(comm, state, last CPU) of one thread."""
    try:
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[36])  # field 3 = state, field 39 = processor


def _schedstat(pid: int, tid: int) -> tuple[int, int, int]:
    """(ns on CPU, ns waiting on a run queue, timeslices) of one thread."""
    try:
        a, b, c = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0, 0
    return int(a), int(b), int(c)


def _names(py_spy: str, pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from ``py-spy dump --native``-free output."""
    out = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    names: dict[int, str] = {}
    for line in out.splitlines():
        m = _THREAD.match(line)
        if m:
            ident = m.group(1)
            tid = int(ident, 16) if ident.startswith("0x") else int(ident)
            names[tid] = m.group(3)
    return names


class _Sampler(threading.Thread):
    def __init__(self, pids: dict[int, str], period_s: float) -> None:
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.samples: list[dict[int, tuple[str, int]]] = []  # per tick: tid -> (state, cpu)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            tick: dict[int, tuple[str, int]] = {}
            for pid in self.pids:
                for tid in _tasks(pid):
                    s = _stat(pid, tid)
                    if s is not None:
                        tick[tid] = (s[1], s[2])
            self.samples.append(tick)


def _instance(run: int, args: argparse.Namespace, vocab: int) -> None:
    procs = _start("fast", 1, 1, "emulated:h200", MODEL)
    try:
        target = procs[-1].address
        asyncio.run(_ttfts(target, 128, args.warmup, 0, vocab))
        pids = {p.proc.pid: p.name for p in procs}
        pids[os.getpid()] = "client"
        names: dict[int, str] = {}
        if args.py_spy:
            for pid in pids:
                names.update(_names(args.py_spy, pid))
        before = {(pid, tid): _schedstat(pid, tid) for pid in pids for tid in _tasks(pid)}
        sampler = _Sampler(pids, args.period_ms / 1e3)
        if args.period_ms > 0:
            sampler.start()
        t0 = time.perf_counter()
        ttfts = asyncio.run(_ttfts(target, 128, 0, args.requests, vocab))
        window = time.perf_counter() - t0
        sampler.stop_event.set()
        if args.period_ms > 0:
            sampler.join()
        after = {(pid, tid): _schedstat(pid, tid) for pid in pids for tid in _tasks(pid)}
        comms = {tid: (_stat(pid, tid) or ("?", "?", -1))[0] for pid, tid in after}
    finally:
        for p in procs:
            p.stop()
    p50 = statistics.median(ttfts)
    load = os.getloadavg()[0]
    print(f"instance {run}: TTFT p50 {p50:.2f} ms, window {window * 1e3:.0f} ms, "
          f"{len(sampler.samples)} samples, load {load:.2f}", flush=True)  # fmt: skip
    rows = []
    for key, (ran1, wait1, slices1) in after.items():
        ran0, wait0, slices0 = before.get(key, (0, 0, 0))
        ran, wait, slices = ran1 - ran0, wait1 - wait0, slices1 - slices0
        if ran < 0.01 * window * 1e9:
            continue
        pid, tid = key
        cpus = Counter(s[tid][1] for s in sampler.samples if tid in s and s[tid][0] == "R")
        seen = sum(1 for s in sampler.samples if tid in s)
        running = sum(cpus.values())
        rows.append((ran, pids[pid], tid, names.get(tid, comms.get(tid, "?")), wait, slices, cpus,
                     running, seen))  # fmt: skip
    rows.sort(reverse=True)
    for ran, proc, tid, name, wait, slices, cpus, running, seen in rows:
        on0 = cpus.get(0, 0) / running if running else float("nan")
        print(f"  {proc:12s} {tid:7d} {name[:28]:28s} cpu {ran / window / 1e7:5.1f}%  "
              f"runq wait {wait / window / 1e7:5.1f}%  slices {slices:6d}  "
              f"R {running / max(seen, 1):4.0%}  on cpu0 {on0:4.0%}", flush=True)  # fmt: skip
    hot = [r[2] for r in rows if r[1] != "client"][:2]
    if len(hot) == 2:
        a, b = hot
        both = [s for s in sampler.samples if a in s and b in s and s[a][0] == "R" and s[b][0] == "R"]
        same = sum(1 for s in both if s[a][1] == s[b][1])
        print(f"  hot pair {a},{b}: both runnable in {len(both)} samples, same CPU in {same}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--period-ms", type=float, default=2.0, help="0: no sampling, schedstat only")
    parser.add_argument("--py-spy", default="", help="path of a py-spy binary to name the threads")
    args = parser.parse_args()
    vocab = load_config(MODEL).vocab_size
    for run in range(args.instances):
        _instance(run, args, vocab)


if __name__ == "__main__":
    main()
