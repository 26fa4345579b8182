"""Is the host CPU the bottleneck of an emulated run?

Emulated ranks sleep for modelled device time, so a run measures scheduling only while the host has CPU
to spare: if the processes need more CPU than the cores give, sleeps end late and RPCs queue, and the
result says more about the host than the design. Take a snapshot of the run's processes before and after
a wall interval and compare CPU seconds used (``/proc/<pid>/stat`` utime + stime) with wall * cores:

    start = take_snapshot(pids)
    ...  # the run
    report = cpu_report(start, take_snapshot(pids))
    if report.bottleneck: ...

Linux only (reads /proc). Children's CPU is not counted: list every process of the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

BOTTLENECK_THRESHOLD = 0.8
"""Fraction of the cores busy from which the host, not the emulated devices, is taken to set the pace:
past it the ranks' sleeps end late and their RPCs queue for a core."""


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU time of some processes and of the whole host at one instant."""

    wall_s: float
    """``time.monotonic()`` when taken."""
    cpu_s_by_pid: dict[int, float]
    """utime + stime (s) of each process still alive."""
    host_busy_s: float
    """Busy CPU seconds of the whole host since boot (all cores; /proc/stat minus idle and iowait)."""


@dataclass(frozen=True, slots=True)
class CpuReport:
    """CPU used by a run's processes over a wall interval, against what the host's cores could give."""

    wall_s: float
    cores: int
    cpu_s: float
    """CPU seconds used by the listed processes in the interval."""
    cpu_s_by_pid: dict[int, float]
    utilisation: float
    """``cpu_s / (wall_s * cores)``: fraction of the host the run's processes used."""
    host_utilisation: float
    """Fraction of all cores busy over the interval, whatever process used them."""
    threshold: float
    vanished: tuple[int, ...] = field(default=())
    """Processes that exited during the interval (their CPU is not counted)."""

    @property
    def bottleneck(self) -> bool:
        """True when the run's processes, or the host as a whole, used at least ``threshold`` of the cores."""
        return max(self.utilisation, self.host_utilisation) >= self.threshold

    def summary(self) -> str:
        """One line for logs and benchmark output."""
        verdict = (
            "CPU-BOUND: emulated timings are not trustworthy" if self.bottleneck else "CPU not a bottleneck"
        )
        return (
            f"{self.cpu_s:.2f} CPU-s over {self.wall_s:.2f} s wall on {self.cores} cores: run "
            f"{self.utilisation:.0%}, host {self.host_utilisation:.0%} (threshold {self.threshold:.0%}); {verdict}"
        )


def process_cpu_s(pid: int) -> float | None:
    """utime + stime (s) of a process, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS


def host_busy_s() -> float:
    """Busy CPU seconds of all cores since boot, from the aggregate ``cpu`` line of /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0
    ticks = [int(x) for x in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    guest = sum(ticks[8:10]) if len(ticks) > 9 else 0  # already counted in user / nice
    return (sum(ticks) - idle - guest) / _CLOCK_TICKS


def host_cores() -> int:
    """Cores this process may run on (the affinity mask where available)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def take_snapshot(pids: Iterable[int]) -> CpuSnapshot:
    """CPU time of ``pids`` (those alive) and of the host, now."""
    by_pid = {pid: cpu for pid in pids if (cpu := process_cpu_s(pid)) is not None}
    return CpuSnapshot(wall_s=time.monotonic(), cpu_s_by_pid=by_pid, host_busy_s=host_busy_s())


def cpu_report(
    start: CpuSnapshot, end: CpuSnapshot, *, cores: int | None = None, threshold: float = BOTTLENECK_THRESHOLD
) -> CpuReport:
    """Compare CPU used between two snapshots with ``wall * cores``; ``threshold`` marks a bottleneck.

    Processes only in ``start`` are reported as ``vanished``; processes only in ``end`` count from zero
    (they started in the interval).
    """
    n_cores = cores if cores is not None else host_cores()
    wall = max(end.wall_s - start.wall_s, 1e-9)
    used = {pid: max(cpu - start.cpu_s_by_pid.get(pid, 0.0), 0.0) for pid, cpu in end.cpu_s_by_pid.items()}
    total = sum(used.values())
    host = max(end.host_busy_s - start.host_busy_s, 0.0)
    return CpuReport(
        wall_s=wall,
        cores=n_cores,
        cpu_s=total,
        cpu_s_by_pid=used,
        utilisation=total / (wall * n_cores),
        host_utilisation=min(host / (wall * n_cores), 1.0),
        threshold=threshold,
        vanished=tuple(sorted(set(start.cpu_s_by_pid) - set(end.cpu_s_by_pid))),
    )
