"""Shared futexes on words of a shared-memory mapping (Linux ``futex`` and ``futex_waitv``, by ctypes).

Why: the fast plane's doorbells were named FIFOs, and a pipe write wakes its reader with a *synchronous*
wake-up (the kernel expects the writer to sleep next and runs the woken thread on the writer's core).
The attention compute thread rings one doorbell per expert rank of a layer and goes on posting; with four
expert ranks it waited behind the woken poll threads, 0.48 ms mean and 1.9 ms p90 per ring
(benchmarks/README.md, "CPU per-layer cost, round 2"). ``FUTEX_WAKE`` is an ordinary wake-up and costs
the waker one system call with no file behind it. ``futex_waitv`` (Linux 5.16) lets one poll thread sleep
on the words of every link it serves at once, as ``select`` did on their FIFOs.

The futexes are *shared* ones (no ``FUTEX_PRIVATE_FLAG``): the kernel keys them by the mapped page, so
the two processes that map a region wait and wake on the same word. A word's address is only used while
its mapping is alive; the kernel checks every address (a stale one fails with ``EFAULT``, never faults).

``available()`` is False where the system calls are missing (another OS, an old kernel, a seccomp filter
that refuses them, or ``ASAP_FAST_FUTEX=0`` in the environment, the A/B switch of the benchmarks): the
doorbell FIFOs are used then.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
import time
from collections.abc import Sequence
from functools import cache

__all__ = ["WAKE_ALL", "Word", "address_of", "available", "wait_any", "wake"]

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}
_SYS_FUTEX_WAITV = {"x86_64": 449, "aarch64": 449}
_FUTEX_WAKE = 1  # shared: no FUTEX_PRIVATE_FLAG (128)
_FUTEX2_SIZE_U32 = 0x02
_CLOCK_MONOTONIC = 1
_L = ctypes.c_long
WAKE_ALL = 0x7FFFFFFF
"""``wake``'s count that wakes every waiter (a word two threads of one process may sleep on)."""


class _Waitv(ctypes.Structure):
    _fields_ = [
        ("val", ctypes.c_uint64),
        ("uaddr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.machine() not in _SYS_FUTEX:
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)  # CDLL calls release the GIL while they block
    except OSError:
        return None


@cache
def available() -> bool:
    """Whether shared futex waits and wakes work here (probed once: a wait that must return at once)."""
    if os.environ.get("ASAP_FAST_FUTEX", "1") == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    word = ctypes.c_uint32(0)
    waiter = (_Waitv * 1)(_Waitv(1, ctypes.addressof(word), _FUTEX2_SIZE_U32, 0))
    timeout = _Timespec(0, 0)
    ctypes.set_errno(0)
    rc = libc.syscall(
        _L(_SYS_FUTEX_WAITV[platform.machine()]),
        waiter,
        _L(1),
        _L(0),
        ctypes.byref(timeout),
        _L(_CLOCK_MONOTONIC),
    )
    if rc != -1 or ctypes.get_errno() != errno.EAGAIN:  # the word is 0, not 1: EAGAIN is the answer
        return False
    return wake(ctypes.addressof(word)) >= 0


def address_of(buf: memoryview, offset: int) -> int:
    """The address of ``buf[offset]`` (a writable buffer: a shared mapping). No export of ``buf`` is kept,
    so the mapping can still be closed; the address is valid only as long as it is mapped."""
    view = (ctypes.c_char * 1).from_buffer(buf, offset)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def wake(address: int, count: int = 1) -> int:
    """Wake up to ``count`` threads waiting on the u32 at ``address``; how many woke (-1: failed)."""
    libc = _libc()
    if libc is None:
        return -1
    rc: int = libc.syscall(
        _L(_SYS_FUTEX[platform.machine()]), ctypes.c_void_p(address), _L(_FUTEX_WAKE), _L(count), None
    )
    return rc


def wait_any(addresses: Sequence[int], value: int | Sequence[int], timeout_s: float) -> bool:
    """Sleep while every u32 at ``addresses`` holds ``value`` (one for all, or one per address), until
    one is woken or ``timeout_s`` passes; False if the call failed (the caller then waits another way)."""
    libc = _libc()
    if libc is None or not addresses or len(addresses) > 128:
        return False
    key = (tuple(addresses), value if isinstance(value, int) else tuple(value))
    call = _waits.get(key)
    if call is None:
        call = _wait_call(key)
        if call is None:
            return False
    waiters, count, timeout, timeout_ref = call
    deadline = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int(timeout_s * 1e9)
    timeout.tv_sec, timeout.tv_nsec = divmod(deadline, 1_000_000_000)
    ctypes.set_errno(0)
    rc = libc.syscall(_waitv_nr(), waiters, count, _ZERO, timeout_ref, _MONOTONIC)
    if rc >= 0:
        return True
    return ctypes.get_errno() in (errno.EAGAIN, errno.ETIMEDOUT, errno.EINTR)


_ZERO = _L(0)
_MONOTONIC = _L(_CLOCK_MONOTONIC)
_WaitCall = tuple[ctypes.Array[_Waitv], ctypes.c_long, _Timespec, object]
_WaitKey = tuple[tuple[int, ...], int | tuple[int, ...]]
_waits: dict[_WaitKey, _WaitCall] = {}
"""The arguments of ``wait_any`` per (addresses, values), built once: a poll thread parks on the same
words every time, and building the ctypes structures was ~15 of the ~20 µs a park cost in Python. Each
entry holds its own timeout, so only one thread may wait on one set of words at a time: a poll
thread's own set, or a compute thread's, which holds its own wake-up word (``asap.dataplane.direct``
``Wake``) beside the completion words it shares with the poll thread."""


@cache
def _waitv_nr() -> ctypes.c_long:
    return _L(_SYS_FUTEX_WAITV[platform.machine()])


def _wait_call(key: _WaitKey) -> _WaitCall | None:
    addresses, value = key
    values = (value,) * len(addresses) if isinstance(value, int) else value
    if len(values) != len(addresses):
        return None
    waiters = (_Waitv * len(addresses))(
        *(_Waitv(v, address, _FUTEX2_SIZE_U32, 0) for address, v in zip(addresses, values, strict=True))
    )
    timeout = _Timespec(0, 0)
    call = (waiters, _L(len(addresses)), timeout, ctypes.byref(timeout))
    if len(_waits) >= 256:  # links come and go: start over rather than grow
        _waits.clear()
    _waits[key] = call
    return call


class Word:
    """A u32 of this process's own memory to sleep on beside shared words (``wait_any``), e.g. a
    thread's wake-up flag that other threads of the process set: its ``address`` and ``value``."""

    __slots__ = ("_cell", "address")

    def __init__(self) -> None:
        self._cell = ctypes.c_uint32(0)
        self.address = ctypes.addressof(self._cell)

    @property
    def value(self) -> int:
        return self._cell.value

    @value.setter
    def value(self, value: int) -> None:
        self._cell.value = value
