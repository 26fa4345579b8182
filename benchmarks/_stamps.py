"""Timestamps of a request's hops inside the service processes, for ``request_breakdown.py``.

``install()`` wraps a few functions of the scheduler and the attention rank so that each call appends
``NAME TIME_NS`` (``time.time_ns``) to the file named by ``ASAP_BENCH_STAMPS`` (one ``O_APPEND`` write,
~5 µs). Nothing else changes: the wrapped functions are called as before. Tracing is not used because its
spans cost far more host time than what they measure (per layer and per dispatch).
"""

from __future__ import annotations

import functools
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

_FD: int | None = None


def stamp(name: str) -> None:
    if _FD is not None:
        os.write(_FD, f"{name} {time.time_ns()}\n".encode())


def _wrap(owner: Any, attr: str, enter: str | None, leave: str | None) -> None:
    fn: Callable[..., Any] = getattr(owner, attr)
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapped(*args: Any, **kwargs: Any) -> Any:
            if enter:
                stamp(enter)
            try:
                return await fn(*args, **kwargs)
            finally:
                if leave:
                    stamp(leave)

        setattr(owner, attr, awrapped)
        return

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if enter:
            stamp(enter)
        try:
            return fn(*args, **kwargs)
        finally:
            if leave:
                stamp(leave)

    setattr(owner, attr, wrapped)


def _name_threads() -> None:
    """Give every thread started from now on its Python name as its OS name (``/proc/PID/task/*/comm``),
    so the benchmark can tell the threads' CPU time apart."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None)
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def named(self: threading.Thread) -> None:
        libc.prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
        bootstrap(self)

    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]


def install() -> None:
    """Open the stamp file and wrap the scheduler's and the attention rank's per-request functions."""
    global _FD
    path = os.environ.get("ASAP_BENCH_STAMPS")
    if not path:
        return
    _FD = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _name_threads()
    sample = os.environ.get("ASAP_BENCH_SAMPLE")
    if sample:
        sample_frames(f"{sample}.{os.getpid()}")
    from attention_svc import core, direct_runner, server
    from scheduler_svc import attention_client
    from scheduler_svc import server as scheduler_server

    _wrap(scheduler_server.SchedulerServicer, "_answer", "s.arrive", "s.answer")
    _wrap(attention_client._AttentionLink, "run", "s.send", "s.recv")
    _wrap(server.AttentionServicer, "run_assignment", "a.assign", "a.result")
    _wrap(core.AttentionExecutor, "run_batch", "a.run_batch", None)
    _wrap(direct_runner.DirectRunner, "_end", "a.end", None)
    _wrap(core, "sample_all", "a.sample0", "a.sample1")
    advance = core.AttentionExecutor._advance

    def timed_advance(self: Any, gen: Any, previous: Any, all_ranks: bool = False, hold: bool = False) -> Any:
        stamp("a.first" if previous is None else "a.take")
        out = advance(self, gen, previous, all_ranks, hold)
        if not isinstance(out, tuple):
            stamp("a.logits")
        return out

    core.AttentionExecutor._advance = timed_advance  # type: ignore[method-assign]


BOOT = (
    "import runpy, sys; from benchmarks import _stamps; _stamps.install(); module = sys.argv[1]; "
    "sys.argv = sys.argv[1:]; runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
"""``python -c BOOT MODULE ARGS...``: run ``python -m MODULE ARGS...`` with the stamps installed."""


def sample_frames(path: str, interval_s: float = 5e-4) -> None:
    """Benchmark diagnosis (``ASAP_BENCH_SAMPLE``): count the innermost two frames of every thread every
    ``interval_s`` while the thread's CPU clock advanced, and write the counts to ``path`` at exit."""
    import atexit
    import collections
    import sys
    import threading

    counts: collections.Counter[str] = collections.Counter()
    clocks: dict[int, int] = {}

    def run() -> None:
        me = threading.get_ident()
        next_dump = time.monotonic() + 2.0
        while True:
            time.sleep(interval_s)
            if time.monotonic() > next_dump:
                next_dump += 2.0
                dump()
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = threading._active.get(ident)  # type: ignore[attr-defined]
                native = getattr(thread, "native_id", None)
                if native is None:
                    continue
                try:
                    cpu = time.clock_gettime_ns(time.pthread_getcpuclockid(ident))
                except (OSError, ProcessLookupError):
                    continue
                last = clocks.get(ident)
                clocks[ident] = cpu
                if last is None or cpu - last < interval_s * 1e9 / 4:
                    continue  # mostly off CPU since the last sample
                outer = frame.f_back
                where = f"{frame.f_code.co_name}:{frame.f_lineno}"
                if outer is not None:
                    where += f" < {outer.f_code.co_name}:{outer.f_lineno}"
                counts[f"{thread.name} | {where}"] += 1

    def dump() -> None:
        with open(path, "w") as out:
            for key, n in counts.most_common(40):
                out.write(f"{n:6d} {key}\n")

    atexit.register(dump)
    threading.Thread(target=run, name="bench-sampler", daemon=True).start()
