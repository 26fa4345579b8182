"""What a process holds, read from /proc (Linux): resident memory, open file descriptors, threads and the
shared-memory segments it maps; and the growth per hour of a series of such samples.

The soak benchmark (``benchmarks/soak.py``) samples every service of a local cluster with these each
minute; a long run must keep them flat (DESIGN §12).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SHM_PREFIX = "/dev/shm/asap_"


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One process at one time."""

    at_s: float
    rss_kib: int
    fds: int
    threads: int
    shm: frozenset[str]
    """``/dev/shm/asap_*`` segments it maps or holds open."""


def sample(pid: int, at_s: float) -> ProcSample | None:
    """``pid``'s figures now; ``None`` if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    segments = {line.split()[-1] for line in maps.splitlines() if SHM_PREFIX in line}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(SHM_PREFIX):
            segments.add(target)
    return ProcSample(
        at_s=at_s,
        rss_kib=int(fields["VmRSS"].split()[0]),
        fds=len(fds),
        threads=int(fields["Threads"]),
        shm=frozenset(s.removesuffix(" (deleted)") for s in segments),
    )


def per_hour(times_s: Sequence[float], values: Sequence[float]) -> float:
    """The least-squares slope of ``values`` over ``times_s``, per hour (0 for fewer than two samples)."""
    n = len(times_s)
    if n < 2:
        return 0.0
    mean_t = sum(times_s) / n
    mean_v = sum(values) / n
    var = sum((t - mean_t) ** 2 for t in times_s)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in zip(times_s, values, strict=True))
    return cov / var * 3600.0


__all__ = ["SHM_PREFIX", "ProcSample", "per_hour", "sample"]
