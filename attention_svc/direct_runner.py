"""Async-mode batches on the compute thread alone: the hot path of planes that offer it
(``asap.dataplane.direct``, today the CPU ``fast`` plane).

Why: on the event-loop path every MoE layer costs two loop wake-ups, a task per expert rank and an
executor submit (1-2 ms per layer on a loaded 2-core host, beyond the exchange itself). Here the compute
thread runs the model to the MoE layer, posts the layer's dispatches straight into the planes, and sleeps
on one ``Wake`` that the plane's poll thread sets when a result lands. The event loop is touched only when
a batch starts (``run``) and ends (its future is resolved, its spans are recorded).

Dual-batch: one *cooperative scheduler* on the compute thread (``_drive``) serves every batch in flight;
while one batch waits for its experts the thread advances another whose results are in. One thread rather
than one per micro-batch: per-thread state (streams, cuDNN graphs, the warm-up's) stays on one thread, and
two Python threads would contend for the GIL at every layer. The scheduler runs as one job of the compute
thread's executor and returns when no batch is left, so other compute-thread work queues behind it only
while batches run.

Arming: the model's step may leave part of the layer's work to come (``MoERequest.rest``: an emulated
device's modelled time, which the host would spend launching and waiting on a real one). The runner fills
the layer's slots first on links that can (``DirectLink.arm``), then finishes the layer, then sends every
dispatch at once; so the split and the fills run inside the layer's time instead of after it. Links
without ``arm`` are posted after the finish; slots filled but never sent (a failure, a cancel) go back.

Cancellation (a deadline, a scheduler that went away): ``run``'s caller is cancelled at once; the
scheduler then abandons the batch's dispatches (their slots wait for the late answers: quarantine) and
closes its generator. Failures are the planes' (a broken stream, a peer whose heartbeat stopped: the
tickets are settled with ``Unavailable`` within the plane's bound); the first failed dispatch of a layer
fails the batch and abandons the others. Tracing: every hop is a span as on the loop path, recorded from
timestamps after the batch (the dispatch spans are opened when posted, since their context travels with
the rows, and ended at the batch's end with the time they were sent).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import torch

from asap.dataplane.direct import SHORT_PARK_S, Armed, DirectLink, Ticket, Wake, wakes_deferred
from asap.dataplane.plane import ExchangeResult, PlaneRequest
from asap.dataplane.spin import SpinBudget
from asap.emulation.clock import reduce_timer_slack
from asap.errors import AsapError, InternalError, Unavailable
from asap.model.attention_part import MoERequest
from asap.model.placement import RankDispatch
from asap.telemetry import setup, spans
from attention_svc.direct_batch import DirectBatch, confirmed, waiting_links

if TYPE_CHECKING:
    pass

__all__ = ["DirectBatch", "DirectRunner"]  # DirectBatch is re-exported from attention_svc.direct_batch

logger = logging.getLogger(__name__)

_PARK_S = 1.0
"""Longest sleep of an idle scheduler between checks (wake-ups normally end it much sooner)."""

Advance = Callable[..., Any]
"""``advance(gen, previous)`` on the compute thread: combine ``previous`` (request, dispatches, partials;
None at the start), run to the next MoE layer and split it (a ``Step``), or the logits at the end."""


class DirectRunner:
    """The compute thread's cooperative scheduler of hot-path batches (see the module doc)."""

    def __init__(self, thread: Executor, advance: Advance) -> None:
        self._thread = thread
        self._advance = advance
        self._wake = Wake()
        self._lock = threading.Lock()
        self._incoming: list[DirectBatch] = []
        self._running = False
        self.spin = SpinBudget()
        """The bounded spin before a park on links that allow it (``spin_wait``; asap.dataplane.spin)."""
        self.most_active = 0
        """The most batches the scheduler served at once (2 with dual-batch; for tests)."""

    async def run(self, batch: DirectBatch) -> Any:
        """Run ``batch`` to its end on the compute thread; its ``finish`` result. Errors propagate typed."""
        loop = asyncio.get_running_loop()
        batch.loop = loop
        batch.future = loop.create_future()
        with self._lock:
            self._incoming.append(batch)
            start, self._running = not self._running, True
        self._wake.set()
        if start:
            self._thread.submit(self._drive)
        try:
            return await batch.future
        except asyncio.CancelledError:
            batch.cancelled = True
            for ticket in batch.tickets:
                ticket.cancelled = True
            self._wake.set()
            raise
        finally:
            if batch.trace is not None and not batch.cancelled:
                _record(batch)

    # --- the compute thread ------------------------------------------------------------------------

    def _drive(self) -> None:
        active: list[DirectBatch] = []
        try:
            while True:
                self._wake.clear()  # before looking: a result landing from here on ends the wait
                with self._lock:
                    active.extend(self._incoming)
                    self._incoming.clear()
                    if not active:
                        self._running = False
                        return
                self.most_active = max(self.most_active, len(active))
                moved = False
                for batch in list(active):
                    if batch.cancelled:
                        self._drop(batch)
                    elif batch.ready():
                        if not self._move(batch):
                            continue
                    else:
                        continue
                    active.remove(batch)
                    moved = True
                if not moved and not any(b.ready() for b in active):
                    self._park(active)
        except BaseException as exc:  # a bug here must fail the batches, never leave them waiting
            logger.exception("attention hot-path scheduler failed")
            error = InternalError(f"attention hot-path scheduler failed: {exc}")
            with self._lock:
                active.extend(self._incoming)
                self._incoming.clear()
                self._running = False
            for batch in active:
                self._end(batch, error)
            raise

    def _park(self, active: list[DirectBatch]) -> None:
        """Sleep until a result of ``active`` lands (or a batch comes or goes). Links that can take
        their results on this thread (``DirectLink.poll`` / ``park``) are polled here and their doorbells
        watched, so the answer wakes this thread directly, not the plane's poll thread first."""
        links = [link for b in active for link in waiting_links(b)]
        pollable = [link for link in links if hasattr(link, "poll")]

        def poll() -> bool:
            for link in pollable:
                link.poll()
            return self._wake.is_set or any(b.ready() for b in active)

        if poll():
            return
        settled = [b for b in active if b.tickets and all(t.done for t in b.tickets)]
        if settled:  # results in, their modelled transfer still under way: sleep until the first is due
            reduce_timer_slack()
            time.sleep(max(0, min(b.due_in_ns() for b in settled)) / 1e9)
            return
        spin = self.spin if pollable and all(getattr(link, "spin_wait", False) for link in links) else None
        started = time.perf_counter()
        if spin is not None:
            peers = max(len(b.links) for b in active)
            if spin.spin(poll, peers):
                spin.observe(time.perf_counter() - started)
                return
        self._park_on(pollable, poll)
        if spin is not None and any(b.ready() for b in active):
            spin.observe(time.perf_counter() - started)

    def _park_on(self, pollable: list[Any], poll: Callable[[], bool]) -> None:
        """``_park``'s sleep: on futex words where every link offers them, else on the doorbells."""
        parkable = [link for link in pollable if hasattr(link, "park")]
        if parkable and self._wake.has_word and all(hasattr(link, "park_futex") for link in parkable):
            self._park_on_words(parkable, poll)
            return
        fds: list[int] = []
        timeout_s = _PARK_S
        try:
            for link in parkable:
                got = link.park(True)
                if not got:
                    timeout_s = SHORT_PARK_S
                fds.extend(got)
            if not poll():  # published before the flags were seen: no doorbell comes for those
                self._wake.wait(timeout_s, fds)
        finally:
            for link in parkable:
                link.park(False)
        poll()

    def _park_on_words(self, parkable: list[Any], poll: Callable[[], bool]) -> None:
        """``_park`` on futex words (``DirectLink.park_futex``): the completion rings' waiting words and
        the ``Wake``'s own, so an answer wakes this thread with ``FUTEX_WAKE``, not a pipe write."""
        words: list[tuple[int, int]] = []
        timeout_s = _PARK_S
        try:
            for link in parkable:
                got = link.park_futex(True)
                if got is None:
                    timeout_s = SHORT_PARK_S
                else:
                    words.append(got)
            if not poll():  # published before the flags were seen: no wake-up comes for those
                self._wake.wait_words(timeout_s, words)
        finally:
            for link in parkable:
                link.park_futex(False)
        poll()

    def _move(self, batch: DirectBatch) -> bool:
        """One step of ``batch``: take its results, compute to the next MoE layer and post it (or finish).
        True when the batch is over (done or failed). A step computed on early results is held until
        their verdicts came (``DirectBatch.held``), then posted (or finished) by the next call."""
        try:
            if batch.held is not None:  # every verdict of its inputs is in now (``ready``)
                confirmed(batch)
                step, batch.held = batch.held, None
            else:
                previous = None
                if batch.step is not None:
                    previous = self._results(batch)
                start = time.time_ns() if batch.trace is not None else 0
                step = self._advance(batch.gen, previous, hold=True)  # finished in ``_post``
                batch.last_start_ns = start
                if batch.trace is not None and not isinstance(step, torch.Tensor):
                    batch.records.append(_layer_record(batch, step[0], start, time.time_ns()))
                if batch.unconfirmed and not confirmed(batch):
                    batch.held = step  # (the attention's device work is enqueued meanwhile)
                    return False
            if isinstance(step, torch.Tensor):
                result = batch.finish(step)
                if batch.trace is not None:
                    attributes = {spans.MICRO_BATCH: batch.micro_batch}
                    batch.records.append(
                        (spans.ATTENTION_SAMPLE, batch.last_start_ns, time.time_ns(), attributes)
                    )
                batch.gen.close()
                self._end(batch, result)
                return True
            request, dispatches = step
            batch.step = step
            self._post(batch, request, dispatches)
            return False
        except BaseException as exc:
            self._drop(batch)
            self._end(batch, exc)
            return True

    def _results(self, batch: DirectBatch) -> tuple[MoERequest, list[RankDispatch], list[torch.Tensor]]:
        """The layer's results, in dispatch order; the first failure raised (the rest abandoned)."""
        assert batch.step is not None
        request, dispatches = batch.step
        now = time.monotonic_ns()
        if batch.tickets:
            batch.expert_wait_ns += now - min(t.posted_ns for t in batch.tickets)
        for ticket in batch.tickets:
            if isinstance(ticket.outcome, AsapError):
                raise ticket.outcome
        results = [t.outcome for t in batch.tickets]
        batch.unconfirmed = [
            (batch.links[dispatches[i].rank], t) for i, t in enumerate(batch.tickets) if t.verdict_pending
        ]
        batch.tickets = []
        if batch.trace is not None:
            attributes = {spans.LAYER: request.layer, spans.MICRO_BATCH: batch.micro_batch}
            batch.records.append(
                (spans.ATTENTION_COMBINE_WAIT, batch.posted_unix_ns, time.time_ns(), attributes)
            )
        partials = []
        for r in results:
            if not isinstance(r, ExchangeResult):
                raise InternalError(f"hot-path dispatch settled with {type(r).__name__}")
            partials.append(r.hidden)
        return request, dispatches, partials

    def _post(self, batch: DirectBatch, layer: MoERequest, dispatches: list[RankDispatch]) -> None:
        """Send the layer's dispatches. Links that can (``DirectLink.arm``) fill their slots first, while
        the layer's work still runs (``MoERequest.finish``); every dispatch goes out once it is over."""
        armed: list[tuple[DirectLink, PlaneRequest, Ticket, Armed | None]] = []
        sent = 0
        try:
            for dispatch in dispatches:
                request = PlaneRequest(batch.micro_batch, layer.layer, dispatch)
                if batch.trace is not None:
                    self._open_dispatch_span(batch, request)
                ticket = Ticket(self._wake)
                batch.tickets.append(ticket)  # before posting: a cancel must reach a blocked post
                if batch.cancelled:
                    ticket.cancelled = True
                link = batch.links[dispatch.rank]
                arm = getattr(link, "arm", None)
                armed.append((link, request, ticket, arm(request, ticket) if arm is not None else None))
            working = layer.rest is not None
            layer.finish()
            if working and batch.trace is not None:
                _layer_ends(batch, layer.layer, time.time_ns())
            batch.posted_unix_ns = time.time_ns() if batch.trace is not None else 0
            with wakes_deferred():  # every dispatch of the layer published before any expert rank is woken
                for link, request, ticket, slot in armed:
                    ticket.posted_ns = time.monotonic_ns()
                    if slot is None:
                        link.post(request, ticket)
                    else:
                        slot.publish()  # (a failed publish gives its own slot back)
                    sent += 1
        finally:
            for _, _, _, slot in armed[sent:]:  # filled but not sent (a failure, or a cancel): slots back
                if slot is not None:
                    slot.release()

    def _open_dispatch_span(self, batch: DirectBatch, request: PlaneRequest) -> None:
        """The ``attention.dispatch`` span, opened now (its context rides with the rows) and ended with
        the time the dispatch was sent, after the batch."""
        span = setup.get_tracer().start_span(
            spans.ATTENTION_DISPATCH,
            context=batch.trace,
            attributes={
                spans.LAYER: request.layer,
                spans.EXPERT_RANK: request.dispatch.rank,
                spans.TOKENS: request.rows,
                spans.MICRO_BATCH: request.micro_batch,
            },
        )
        request.traceparent, request.tracestate = spans.inject(spans.context_of(span))
        sent: list[int] = []
        request.sent = lambda: sent.append(time.time_ns())
        batch.dispatch_spans.append((span, sent))

    def _drop(self, batch: DirectBatch) -> None:
        """Give up ``batch``: abandon what it posted, close its generator."""
        step = batch.step
        for i, ticket in enumerate(batch.tickets):
            ticket.cancelled = True
            if step is not None and ticket.plane_data is not None:  # posted: a no-op once answered
                batch.links[step[1][i].rank].abandon(ticket)
        batch.tickets = []
        for link, ticket in batch.unconfirmed:  # early results whose verdict may still come
            if ticket.verdict_pending:
                link.abandon(ticket)
        batch.unconfirmed, batch.held = [], None
        try:
            batch.gen.close()
        except Exception:  # the generator's own clean-up failed: the batch is over anyway
            logger.exception("closing micro-batch %d failed", batch.micro_batch)

    def _end(self, batch: DirectBatch, result: Any) -> None:
        """Resolve the batch's future on its loop (an exception or the result)."""
        future, loop = batch.future, batch.loop
        if future is None or loop is None:
            return
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            result = Unavailable(f"micro-batch {batch.micro_batch} stopped: {result!r}")
        loop.call_soon_threadsafe(_resolve, future, result)


def _layer_record(
    batch: DirectBatch, request: MoERequest, start: int, end: int
) -> tuple[str, int, int, dict[str, Any]]:
    attributes = {
        spans.LAYER: request.layer,
        spans.MICRO_BATCH: batch.micro_batch,
        spans.TOKENS: int(request.hidden.shape[0]),
    }
    return (spans.ATTENTION_LAYER, start, end, attributes)


def _layer_ends(batch: DirectBatch, layer: int, end: int) -> None:
    """The ``attention.layer`` record of ``layer`` ends at ``end``: its work ran on past the step, while
    the dispatches were filled (``MoERequest.rest``), and is attention compute, not the dispatch's."""
    for i in range(len(batch.records) - 1, -1, -1):
        name, start, _, attributes = batch.records[i]
        if name == spans.ATTENTION_LAYER and attributes.get(spans.LAYER) == layer:
            batch.records[i] = (name, start, end, attributes)
            return


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _record(batch: DirectBatch) -> None:
    """The batch's spans, from the times taken on the compute thread (on the loop, after the batch)."""
    for span, sent in batch.dispatch_spans:
        span.end(end_time=sent[0] if sent else None)
    batch.dispatch_spans = []
    for name, start, end, attributes in batch.records:
        spans.record(name, batch.trace, start, end, attributes)
    batch.records = []
