"""The streams of the GPU fast plane that may hold a wait on a flag, and why they cannot deadlock.

Why this module: a ``cuStreamWaitValue32`` that has not passed holds its stream, and may hold more.
PyTorch's ``torch.cuda.Stream()`` hands out a per-device pool of 32 streams round robin, so two
"different" torch streams can be one CUDA stream (measured: of 40 pool streams, a wait on stream i
holds stream i+32). And the driver multiplexes a context's streams onto ``CUDA_DEVICE_MAX_CONNECTIONS``
hardware queues (default 8) that execute in order: on one H200 (driver 580, with and without MPS) a
wait on a stream made here held none of 40 others at 8 or at 32 queues (``benchmarks/gpu_queue_probe.py``),
but nothing documents that, so rule 2 checks it for every wait stream instead of assuming it. A wait
whose release needs work queued behind it (directly, or through a host that blocks on that work) never
passes: the merged armed-step tree hung in its third cluster of one process, in a link's
zero-and-synchronize on the event loop, while another link's prefetched copy out waited on pool
streams for a done flag that the expert could write only after that event loop had sent it the link's
announcement.

The rules, each kept here or by the callers named:

1. **Dedicated wait streams.** Every stream that may hold a long wait (the attention's per-slot rx
   streams of prefetched copies out, the expert's per-slot streams of armed steps) is made here with
   ``cuStreamCreateWithPriority(CU_STREAM_NON_BLOCKING)`` and wrapped as ``torch.cuda.ExternalStream``:
   never a pool stream, so no other user of the pool ever enqueues on it.
2. **Probed for a queue of its own.** Before a new wait stream is handed out, ``WaitStreams`` blocks it
   on a word of pinned host memory and checks that an event recorded on each *critical* stream of the
   process (the device's default stream, the compute threads' streams, the links' tx streams, the
   writer, every wait stream handed out) still passes; a CPU store then releases it. A candidate that
   blocks any of them shares a hardware queue with it and is put aside (kept idle, never waited on). So
   a pending wait holds nothing but its own stream.
3. **A writer that never waits.** Poison values and the zeroing of fresh regions go on the process's
   one writer stream (``writer``), which nothing ever makes wait on a flag and which rule 2 keeps off the
   wait streams' queues: a poison is never queued behind the wait it must release.
4. **Bounded.** At most ``wait_budget()`` wait streams per process (half the hardware queues), and rank
   processes raise the queues to 32 (``configure_cuda_connections``, before CUDA initialises: ``asap
   serve``/``asap up`` and the GPU benchmarks call it), so probes seldom fail. Past the budget, or when no
   candidate passes the probe, ``take`` returns None and the caller takes the path with no long wait
   (the expert step launched on the descriptor's arrival, the copy out enqueued on the completion).
5. **Released before reuse.** ``give_back`` is called after the caller poisoned the flags the stream
   may wait on; it waits (bounded) for the stream to drain and keeps it for the next link. Streams are
   not destroyed: the caching allocator may still hold events to record on them for tensors used there
   (``record_stream``), which a destroyed handle would fail; a stream that does not drain within the
   bound is leaked (logged), never reused.

Why this is deadlock-free: by rules 1-2 a pending wait blocks only work of its own stream, all of which
was enqueued on purpose behind it (the step it gates, the copy out it gates). Every such wait is
released by a flag write that depends only on work outside that stream: an attention rx wait on the
expert's done flag, issued only once the expert has attached (its heartbeat seen) and after the request
flag was written on the tx stream; an expert armed wait on the attention's next request flag, which
the attention writes on its tx stream (not blocked: rule 2 on the attention's side) once it has the
answers it needs, which come from the expert's *other* streams (not blocked: rule 2 on the expert's
side). A peer that dies releases everything through the survivor's writer (rule 3), issued by a host
thread that no GPU wait holds. No cycle is left: each wait depends on streams that no pending wait
blocks.

Early results (``ASAP_GPU_HOST_FREE=1``, hot path only) add one wait that is not on a wait stream: the
attention compute stream waits (``wait_event``) for a slot's prefetched copy out, so it is blocked
for the expert's whole computation, not only once the expert's done flag is already enqueued. It adds
no cycle: that event depends on the slot's rx wait stream, whose done flag depends on the expert's
streams and on this dispatch's request flag, written earlier on the same compute stream (ahead of the
wait in its queue). A poison on the writer (a critical stream, probed against the compute threads'
streams, which register before any link) releases the rx stream and with it the compute stream; the
host that issues it (the event loop, on the poll thread's heartbeat tick) is never blocked by a GPU
wait, and the compute thread itself waits for verdicts only by parking (``attention_svc.direct_runner``).
Its cost: work enqueued on the compute stream behind the combine (another micro-batch's attention on
the same thread) waits for that expert result too, so dual-batch overlap on one compute stream is lost;
it stays opt-in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import torch

from asap.dataplane.gpu_flags import StreamFlags, driver_flags

__all__ = [
    "CONNECTIONS_ENV",
    "RANK_CONNECTIONS",
    "WaitStreams",
    "configure_cuda_connections",
    "connections",
    "critical",
    "dedicated_stream",
    "wait_budget",
    "wait_streams",
    "writer",
]

logger = logging.getLogger(__name__)

CONNECTIONS_ENV = "CUDA_DEVICE_MAX_CONNECTIONS"
RANK_CONNECTIONS = 32
"""Hardware queues a rank process asks for (the driver's maximum; its default is 8)."""
_PROBE_S = 0.05
"""How long a probe lets an event on a critical stream pass while the candidate waits."""
_TRIES = 3
_MAX_REJECTED = 16
"""Candidates a process puts aside at most (each a stream nobody uses)."""
_DRAIN_S = 2.0
"""How long ``give_back`` waits for a released stream to drain before it leaks it."""


def configure_cuda_connections(environ: Any = None) -> None:
    """Ask for ``RANK_CONNECTIONS`` hardware queues unless the user chose a number: before CUDA
    initialises in this process (the driver reads it when it makes the context); children inherit it."""
    env = os.environ if environ is None else environ
    env.setdefault(CONNECTIONS_ENV, str(RANK_CONNECTIONS))


def connections(environ: Any = None) -> int:
    """The hardware queues this process's contexts have (``CUDA_DEVICE_MAX_CONNECTIONS``, default 8)."""
    env = os.environ if environ is None else environ
    try:
        return max(1, min(32, int(env.get(CONNECTIONS_ENV, "8"))))
    except ValueError:
        return 8


def wait_budget(environ: Any = None) -> int:
    """Wait streams one process may hold: half its hardware queues (the rest for the other streams)."""
    return max(1, connections(environ) // 2)


def dedicated_stream(device: torch.device, *, priority: int = 0) -> torch.cuda.Stream:
    """A new non-blocking CUDA stream of ``device``, made through the driver (never PyTorch's pool)."""
    from cuda.bindings import driver  # type: ignore[import-not-found,unused-ignore]

    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        torch.zeros(1, device=f"cuda:{index}")  # the primary context current on this thread
        err, handle = driver.cuStreamCreateWithPriority(
            int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING), priority
        )
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuStreamCreateWithPriority failed: {err}")
    return torch.cuda.ExternalStream(int(handle), device=torch.device("cuda", index))  # type: ignore[no-untyped-call]


class WaitStreams:
    """One process's wait streams of one device (see the module doc: rules 2, 4 and 5)."""

    def __init__(
        self,
        device: torch.device,
        *,
        budget: int | None = None,
        flags: StreamFlags | None = None,
        make: Any = None,
        probe: Any = None,
    ) -> None:
        self.device = device
        self.budget = wait_budget() if budget is None else budget
        self._flags = flags
        self._make = make if make is not None else (lambda: dedicated_stream(device))
        self._probe = probe if probe is not None else self._shares_a_queue
        """(candidate, others) -> whether blocking the candidate blocks one of the others."""
        self._lock = threading.Lock()
        self._idle: list[torch.cuda.Stream] = []
        self._idle_plain: list[torch.cuda.Stream] = []
        self._taken: list[torch.cuda.Stream] = []
        self.critical: list[torch.cuda.Stream] = []
        """Streams no wait may block (``critical``); every wait stream handed out joins them in probes."""
        self.rejected = 0
        """Candidates put aside because a probe saw them block a critical stream."""
        self.leaked = 0
        self._word: torch.Tensor | None = None

    def take(self) -> torch.cuda.Stream | None:
        """A wait stream with a hardware queue of its own, or None (budget spent or no candidate passes:
        the caller takes the path with no long wait)."""
        with self._lock:
            if self._idle:
                stream = self._idle.pop()
                self._taken.append(stream)
                return stream
            if len(self._taken) >= self.budget:
                return None
            return self._fresh(waits=True)

    def plain(self) -> torch.cuda.Stream:
        """A critical stream (never a long wait: tx streams, the writer) with a queue no wait stream
        holds where a probe finds one (else the last candidate, logged)."""
        with self._lock:
            stream = self._idle_plain.pop() if self._idle_plain else self._fresh(waits=False)
            assert stream is not None
            self.critical.append(stream)
            return stream

    def _fresh(self, *, waits: bool) -> torch.cuda.Stream | None:
        candidate = None
        for _ in range(_TRIES):
            if self.rejected >= _MAX_REJECTED:
                break
            candidate = self._make()
            others = [*self.critical, *self._taken]
            if not self._probe(candidate, others):
                if waits:
                    self._taken.append(candidate)
                return candidate
            self.rejected += 1  # kept idle for good: a stream nobody ever enqueues on
            logger.info("a new GPU fast-plane stream shares a hardware queue with another: put aside")
        if waits or candidate is None:
            return None if waits else self._make()
        logger.warning("no GPU fast-plane stream with a queue of its own found; one is shared")
        return candidate

    def _shares_a_queue(self, candidate: torch.cuda.Stream, others: list[torch.cuda.Stream]) -> bool:
        """Block ``candidate`` on a pinned host word; does an event recorded on any other stream of the
        probe (critical, handed-out wait streams, the default stream) then fail to pass within
        ``_PROBE_S``? That long, so a stream busy with its own work (a layer: milliseconds) reads as
        busy, not as sharing the candidate's queue; one that passes at once costs no wait at all."""
        others = [*others, torch.cuda.default_stream(self.device)]
        if self._flags is None:
            self._flags = driver_flags()
        if self._word is None:
            self._word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        word = self._word.numpy()
        word[0] = 0
        self._flags.wait(candidate, int(self._word.data_ptr()), 1)
        blocked = not _passes([_mark(s) for s in others], _PROBE_S)
        word[0] = 1  # a CPU store: it releases the candidate whatever the GPU queues hold
        candidate.synchronize()  # type: ignore[no-untyped-call]
        return blocked

    def give_back(self, stream: torch.cuda.Stream) -> None:
        """After the caller poisoned every flag ``stream`` may wait on: wait for it to drain (bounded),
        then keep it for the next link (a wait stream for ``take``, a critical one for ``plain``); a
        stream that does not drain is leaked, never reused."""
        deadline = time.monotonic() + _DRAIN_S
        drained = True
        while not stream.query():  # type: ignore[no-untyped-call]
            if time.monotonic() > deadline:
                logger.error("a GPU fast-plane stream did not drain after its flags were poisoned")
                drained = False
                break
            time.sleep(0.0005)
        with self._lock:
            waits = any(s is stream for s in self._taken)
            self._taken = [s for s in self._taken if s is not stream]
            if not waits:
                self.critical = [s for s in self.critical if s is not stream]
            if not drained:
                self.leaked += 1
            elif waits:
                self._idle.append(stream)
            else:
                self._idle_plain.append(stream)


def _mark(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def _passes(events: list[torch.cuda.Event], within_s: float) -> bool:
    """Whether every event passes within ``within_s`` (polled: never a host wait on the GPU)."""
    deadline = time.monotonic() + within_s
    while not all(e.query() for e in events):  # type: ignore[no-untyped-call]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0001)  # (lets other threads have the GIL)
    return True


_REGISTRY: dict[int, WaitStreams] = {}
_WRITERS: dict[int, torch.cuda.Stream] = {}
_REGISTRY_LOCK = threading.RLock()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def wait_streams(device: torch.device) -> WaitStreams:
    """The process's ``WaitStreams`` of ``device``."""
    index = _index(device)
    with _REGISTRY_LOCK:
        pool = _REGISTRY.get(index)
        if pool is None:
            pool = _REGISTRY[index] = WaitStreams(torch.device("cuda", index))
        return pool


def writer(device: torch.device) -> torch.cuda.Stream:
    """The process's stream of ``device`` for poisons and zeroing: it never waits (rule 3), critical."""
    index = _index(device)
    with _REGISTRY_LOCK:
        stream = _WRITERS.get(index)
        if stream is None:
            stream = _WRITERS[index] = wait_streams(torch.device("cuda", index)).plain()
    return stream


def critical(stream: torch.cuda.Stream) -> None:
    """Register ``stream`` as one no wait stream may share a hardware queue with (rule 2): wait streams
    taken later are probed against it (the compute threads register theirs when they start, before any
    link exists; streams made by ``plain`` are themselves probed against the wait streams already out)."""
    pool = wait_streams(stream.device)
    with pool._lock:
        if all(s.cuda_stream != stream.cuda_stream for s in pool.critical):
            pool.critical.append(stream)
