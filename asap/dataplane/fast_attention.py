"""The attention rank's end of a fast link: the dispatches it publishes into its region and the
completions its poll thread takes (the region, its layout and heartbeat words: ``fast_region``; the slots
as credits: ``slot_credits``; who waits for a dispatch: ``pending``).

Per layer nothing but stores into shared memory happens on the sending thread: a dispatch takes a slot
(a credit: with every slot in use the dispatch waits, nothing is dropped), writes the slot header, ids,
weights and rows, publishes one descriptor and rings the expert's doorbell only if its poll thread is
parked. The process's poll thread (``shared_poller``) takes completions, copies results out of the slot and
settles the dispatch's *sink*: an asyncio future (``FastPlane.exchange``: woken once with
``call_soon_threadsafe``) or a hot-path ``Ticket`` (the attention compute thread is woken directly, no
event loop). Slots, sequence numbers and pending dispatches share one lock, so both kinds of sender may
share a link end.

Failure: a link end is *broken* when the stream breaks (``stream_ended``), when the expert rank's
heartbeat is older than ``peer_timeout_s`` while dispatches wait (a frozen or dead process), or when the
expert never attached the region within ``attach_s`` (default ``ATTACH_S``). Every waiting dispatch then
fails with ``Unavailable`` at once, the region is retired (its slots are never reused: whatever the
expert might still write lands in memory nobody reads) and the next exchange announces a fresh region. A
dispatch abandoned while the expert may still write its slot keeps that slot until its completion
arrives or the region is retired (the quarantine rule of ``asap.dataplane.link``); such dispatches are
counted in ``quarantined``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from asap.dataplane.direct import Ticket
from asap.dataplane.fast_region import AttentionRegion
from asap.dataplane.fastlink import (
    FLAG_SHAPE_ONLY,
    HEARTBEAT_EXPERT,
    Completion,
    LinkGeometry,
    SlotHeader,
    heartbeat,
)
from asap.dataplane.pending import (
    Outcome,
    PendingDispatch,
    dispatch_header,
    dispatch_request,
    fail_pending,
    settle_future,
    sink_for,
)
from asap.dataplane.plane import ExchangeResult
from asap.dataplane.poller import HeldUntil, OnePerProcess, PollThread, doorbell_backoff, drain
from asap.dataplane.ring import WAIT_BELL, full_fence
from asap.dataplane.slot_credits import SlotCredits
from asap.errors import AsapError, InvalidArgument, Unavailable

__all__ = ["ATTACH_S", "AttentionLinkEnd", "shared_poller"]

logger = logging.getLogger(__name__)

_POLLER = OnePerProcess(lambda: PollThread("fast-completions", backoff=doorbell_backoff))


def shared_poller() -> PollThread:
    """The attention process's one poll thread for the completions of all its fast links."""
    return _POLLER.get()


ATTACH_S = 30.0
"""How long an announced region may wait for the expert rank's first heartbeat while dispatches wait
(default of ``--fast-attach-timeout``)."""


@dataclass(slots=True)
class _Delayed:
    due_ns: int
    pending: PendingDispatch
    outcome: Outcome = field(compare=False)


class AttentionLinkEnd(SlotCredits, AttentionRegion):
    """One region of a fast link, attention side; ``announcement()`` goes out on the link's stream (its
    slots as credits: ``SlotCredits``; its shared memory: ``AttentionRegion``)."""

    def __init__(
        self,
        geometry: LinkGeometry,
        *,
        attention_rank: int,
        expert_rank: int,
        dtype: torch.dtype,
        peer: str,
        peer_timeout_s: float,
        attach_s: float = ATTACH_S,
        result_link_s: float | None = None,
        loop: asyncio.AbstractEventLoop,
        poller: PollThread,
    ) -> None:
        SlotCredits.__init__(self, geometry.slots, peer=peer, loop=loop)
        AttentionRegion.__init__(
            self, geometry, attention_rank=attention_rank, expert_rank=expert_rank, dtype=dtype
        )
        self.attention_rank = attention_rank
        self.peer_timeout_ns = int(peer_timeout_s * 1e9)
        self.attach_ns = int(attach_s * 1e9)
        self._result_link_s = result_link_s
        """Emulated compute: seconds per result byte of the modelled link (charged on delivery)."""
        self._poller = poller
        self._pending: dict[int, PendingDispatch] = {}
        self._reserved: dict[int, int] = {}
        """slot -> the sequence number its header was written with (``header``), taken by ``publish``."""
        self.quarantined = 0
        """Dispatches abandoned while the expert could still write their slot."""
        self._consume = threading.Lock()
        """Held by whichever thread takes completions: the poll thread, or a hot-path compute thread
        waiting on this end (``asap.dataplane.direct``: it takes its results itself)."""
        self.parked_elsewhere = 0
        """Compute threads sleeping on this end (its doorbell or its completion ring's futex word): the poll
        thread does not park on it then."""
        self.loop_senders = False
        """Whether a dispatch was ever published with a future to settle (``exchange``, the event-loop
        path); until then every sender is a hot-path compute thread, which takes its own answers."""
        self._delayed: HeldUntil[_Delayed] = HeldUntil(lambda d: d.due_ns)
        self.loop_bell = False
        """The event loop waits on the completion doorbell itself (``_watch``, from the first
        event-loop dispatch on): a completion wakes the loop, which takes it and settles its future in
        that callback, instead of waking the poll thread, which would hand it to the loop through
        ``call_soon_threadsafe`` (a second wake-up, and the loop waiting for the GIL until the poll thread
        parks again). The poll thread then never parks on this end (it still sweeps and ticks it at its
        park timeout), so the ring's waiting flag is the loop's alone. Off by default; ends whose
        event-loop path has no held results and no hot-path sleepers turn it on (GPU ends:
        ``ASAP_GPU_LOOP_BELL``)."""
        self._loop_thread: int | None = None
        """The event loop's thread while ``loop_bell`` watches (``_deliver`` settles directly on it)."""
        self._seq = 0
        self.announced_ns = time.monotonic_ns()
        self.attached = False
        poller.add(self)

    # --- the poll thread's side (Endpoint) --------------------------------------------------------

    def poll(self, now_ns: int) -> bool:
        """Take arrived completions (the poll thread, or a waiting compute thread: whoever gets there)."""
        if not self._consume.acquire(blocking=False):
            return False  # the other thread is taking them
        try:
            return self._take_arrived(now_ns)
        finally:
            self._consume.release()

    def _take_arrived(self, now_ns: int) -> bool:
        """``poll``'s work, under ``_consume``."""
        if self.broken is not None and not self._buf:
            return False
        worked = drain(self.completions, lambda raw: self._take(Completion.unpack(raw), now_ns))
        with self._lock:
            due = self._delayed.release(now_ns)
        for d in due:
            self._deliver(d.pending, d.outcome)
        # results still held for their modelled transfer: keep sweeping closely (no doorbell comes)
        return worked or bool(due) or bool(self._delayed)

    def _watch(self) -> None:
        """On the event loop, at an event-loop dispatch of a ``loop_bell`` end: from now on the expert rings
        the completion doorbell after every completion (the ring's waiting flag stays set) and the loop
        reads it (``_on_bell``). Set before the dispatch is published, so its completion rings."""
        if self._loop_thread is not None:
            return
        self._loop_thread = threading.get_ident()
        self.completions.set_waiting(True, WAIT_BELL)
        full_fence()  # the flag's store before the expert's look at it (after our publish)
        self._loop.add_reader(self.completion_bell.fileno(), self._on_bell)

    def _on_bell(self) -> None:
        """The completion doorbell rang (the event loop's reader): take what arrived. Waits for the poll
        thread if it is sweeping this end meanwhile (it holds ``_consume`` for a few µs), so a completion
        that lands after its look is not left for its next sweep."""
        self.completion_bell.drain()  # first: a completion after it rings again
        with self._consume:
            self._take_arrived(time.monotonic_ns())

    def _unwatch(self) -> None:
        """Stop the loop's reader (``close``): on the loop's thread now, from another one at its next
        iteration (the doorbell's descriptor may be closed by then; the selector forgets it either way)."""
        loop_thread, self._loop_thread = self._loop_thread, None
        if loop_thread is None:
            return
        fd = self.completion_bell.fileno()

        def remove() -> None:
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                self._loop.remove_reader(fd)

        if threading.get_ident() == loop_thread:
            remove()
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(remove)

    @property
    def park_here(self) -> bool:
        """Whether the poll thread parks on this end's doorbell (``PollThread``): not while a compute
        thread sleeps on it, and not while only hot-path senders used it. Their compute thread takes
        its own answers (``DirectLink.poll`` when it is busy, its own park when idle), so the poll
        thread woken by every completion too (one per expert rank and layer, while it sat in a park
        begun before the compute thread's) cost CPU and bought nothing: 0.16 ms CPU per layer with
        one expert rank, 0.7 ms with four (``benchmarks/layer_hops.py``, thread ``fast-completions``).
        It still sweeps and ticks the end at its park timeout (heartbeats, abandoned slots)."""
        return self.parked_elsewhere == 0 and self.loop_senders and not self.loop_bell

    def held(self) -> int:
        """Results held back for their modelled transfer time (the poller must look again soon)."""
        return len(self._delayed)

    def _take(self, completion: Completion, now_ns: int) -> None:
        with self._lock:
            pending = self._pending.get(completion.seq)
        if pending is None:
            logger.warning("%s: completion for unknown dispatch seq=%d ignored", self.peer, completion.seq)
            return
        outcome: Outcome
        if completion.status:
            outcome = self._error_in(pending.slot, completion.status)
        elif completion.rows != pending.rows:
            outcome = InvalidArgument(
                f"{self.peer}: a completion of {completion.rows} rows for a dispatch of {pending.rows}"
            )
        elif self._result_link_s is not None:  # emulated: shapes only, the result's transfer charged here
            outcome = torch.empty(pending.rows, self.geometry.hidden_size, dtype=self.dtype, device="meta")
            nbytes = pending.rows * self.geometry.hidden_size * self.dtype.itemsize
            due = now_ns + int(self._result_link_s * nbytes * 1e9)
            if isinstance(pending.sink, Ticket):  # the waiting thread itself sleeps until it is due
                self._deliver(pending, outcome, not_before_ns=due)
                return
            if due > now_ns + 1000:
                with self._lock:
                    self._delayed.hold(_Delayed(due, pending, outcome))
                return
        else:  # results were written over the rows
            outcome = self._results_in(pending.slot, pending.rows)
        self._deliver(pending, outcome)

    def _deliver(self, pending: PendingDispatch, outcome: Outcome, *, not_before_ns: int = 0) -> None:
        with self._lock:
            if self._pending.pop(pending.seq, None) is None:
                return  # the link broke meanwhile: already failed
        sink = pending.sink
        if isinstance(sink, Ticket):  # the compute thread waits: wake it directly, no event loop
            self._release(pending.slot)
            if not pending.abandoned:
                result = outcome if isinstance(outcome, AsapError) else ExchangeResult(outcome)
                sink.settle(result, not_before_ns=not_before_ns)
            return
        if self._loop_thread is not None and threading.get_ident() == self._loop_thread:
            self._settle(pending, outcome)  # taken in the loop's own reader (``_on_bell``)
            return
        self._loop.call_soon_threadsafe(self._settle, pending, outcome)

    def unattached_idle_ns(self, now_ns: int) -> int:
        """How long this end has waited for the expert rank to attach with no dispatch on it (0 once
        attached, or while dispatches wait): an end whose announcement the expert never acted on is
        replaced by a fresh one before new dispatches go on it (``FastPlane``)."""
        if heartbeat(self._buf, HEARTBEAT_EXPERT):  # the word, not ``attached``: see ``tick``
            return 0
        with self._lock:
            if self._pending:
                return 0
        return max(0, now_ns - self.announced_ns)

    def tick(self, now_ns: int) -> None:
        expert_beat = self._beat(now_ns, attached=self.attached)
        if expert_beat and not self.attached:
            self.attached = True
            self._loop.call_soon_threadsafe(self._unlink_names)
        with self._lock:
            waiting = any(not p.abandoned for p in self._pending.values())
        # Before the first heartbeat the expert rank has not yet read the announcement from its stream
        # (busy starting, on a loaded host); a dead one breaks that stream, so attaching gets longer.
        since, bound = (
            (expert_beat, self.peer_timeout_ns) if expert_beat else (self.announced_ns, self.attach_ns)
        )
        if waiting and self.broken is None and now_ns - since > bound:
            what = "stopped answering" if expert_beat else "never attached the fast link"
            error = Unavailable(f"{self.peer}: {what} (no heartbeat for {(now_ns - since) / 1e9:.2f} s)")
            self._loop.call_soon_threadsafe(self.fail, error)

    # --- the event loop's side ---------------------------------------------------------------------

    def publish(
        self,
        slot: int,
        micro_batch: int,
        layer: int,
        rows: int,
        *,
        shape_only: bool,
        link_s: float,
        ticket: Ticket | None = None,
    ) -> tuple[int, asyncio.Future[torch.Tensor] | None]:
        """Publish the filled ``slot``; returns its sequence number and the future of its result (on the
        event loop), or None when ``ticket`` (a hot-path sender, any thread) is to be settled instead."""
        future, sink = sink_for(self._loop, ticket)
        if ticket is None:
            self.loop_senders = True  # the poll thread settles these: it parks on the doorbell now
            if self.loop_bell:  # unless the loop itself waits on it
                self._watch()
        with self._lock:
            if self.broken is not None:
                raise self.broken
            seq = self._reserved.pop(slot, 0)
            if not seq:
                self._seq += 1
                seq = self._seq
            self._pending[seq] = PendingDispatch(seq, slot, rows, sink)
        not_before = time.monotonic_ns() + int(link_s * 1e9) if link_s > 0 else 0
        request = dispatch_request(
            slot=slot,
            seq=seq,
            micro_batch=micro_batch,
            layer=layer,
            rows=rows,
            attention_rank=self.attention_rank,
            flags=FLAG_SHAPE_ONLY if shape_only else 0,
            not_before_ns=not_before,
        )
        if not self.requests.try_push(request.pack()):  # cannot happen: slots bound the records
            with self._lock:
                self._pending.pop(seq, None)
            raise Unavailable(f"{self.peer}: fast link request ring is full")
        self.requests.wake(self.request_bell)  # held until the layer's last post inside ``wakes_deferred``
        return seq, future

    def header(
        self, micro_batch: int, layer: int, rows: int, traceparent: str, tracestate: str, slot: int = -1
    ) -> SlotHeader:
        """The header of the next dispatch; with ``slot``, its sequence number is reserved for that slot
        (senders on several threads may fill slots at once; ``publish`` of the slot uses it)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            if slot >= 0:
                self._reserved[slot] = seq
            else:
                self._seq -= 1  # only a look at the next number (tests build headers this way)
        return dispatch_header(micro_batch, seq, layer, rows, traceparent, tracestate)

    def abandon(self, seq: int) -> None:
        """The exchange of ``seq`` gave up: its slot stays taken until its completion arrives (its settle
        frees it) or the region is retired; the peer may still write into it."""
        with self._lock:
            pending = self._pending.get(seq)
            if pending is not None and not pending.abandoned:
                pending.abandoned = True
                self.quarantined += 1

    def give_back(self, slot: int) -> None:
        """A slot taken but never published."""
        with self._lock:
            self._reserved.pop(slot, None)
        self._release(slot)

    def _settle(self, pending: PendingDispatch, outcome: Outcome) -> None:
        self._release(pending.slot)
        future = pending.sink
        assert not isinstance(future, Ticket)
        settle_future(future, outcome)

    def fail(self, error: AsapError) -> None:
        """Break this link end: every waiting dispatch fails with ``error``; the region is retired."""
        with self._lock:
            if self.broken is not None:
                return
            self.broken = error
            self.requests.close()
            pending, self._pending = self._pending, {}
            self._delayed.clear()
            self._slot_freed.notify_all()
        failed = fail_pending(pending.values(), error)
        self._fail_waiters(error)
        if failed:
            logger.warning("%s; failed %d waiting dispatches", error.message, failed)
        self.close()

    def close(self) -> None:
        """Stop polling, drop the names and the mapping (idempotent)."""
        if self.broken is None:  # fail everything still waiting first (it closes the end)
            self.fail(Unavailable(f"{self.peer}: fast link closed"))
            return
        self._poller.remove(self)
        self._unwatch()
        self._unlink_names()
        with self._consume:  # a compute thread taking its results is done with the mapping first
            self._unmap()
