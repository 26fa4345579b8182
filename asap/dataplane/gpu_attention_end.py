"""The attention end of a GPU fast link: its slots' payload in a ``CudaRegion``, filled and copied out
by CUDA streams that write and wait on the slots' flags (the protocol: ``asap.dataplane.gpu_fast``).

The event loop or a hot-path compute thread enqueues a dispatch's fill and request flag on the *tx*
stream, publishes the descriptor, and then (``prefetch``) has the slot's *rx* stream wait for the done
flag and copy the results out; the poll thread, on a completion, hands that result on (or enqueues the
copy itself if the completion came first), and the slot's next fill waits for that copy on the GPU. A broken or retired link poisons every flag
of the region, so no stream is left waiting.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from asap.dataplane.cuda_ipc import CudaRegion
from asap.dataplane.fast_attention import AttentionLinkEnd
from asap.dataplane.fastlink import (
    DONE_FLAG_AT,
    HEARTBEAT_EXPERT,
    REQUEST_FLAG_AT,
    Completion,
    LinkGeometry,
    SlotHeader,
    heartbeat,
)
from asap.dataplane.gpu_flags import StreamFlags, poison_value, write_words
from asap.dataplane.gpu_layout import (
    STEP_WORDS_AT,
    gpu_layout_rows,
    lean_fill_enabled,
    prefetch_enabled,
)
from asap.dataplane.gpu_streams import wait_streams, writer
from asap.dataplane.pending import Outcome, PendingDispatch
from asap.devices import attach_ready
from asap.errors import AsapError
from asap.model.grouped import BUCKETS
from asap.model.placement import RankDispatch
from asap.v1 import expert_pb2

__all__ = ["DEVICE_TIMING_ENV", "GpuAttentionLinkEnd", "Timing"]

DEVICE_TIMING_ENV = "ASAP_GPU_DEVICE_TIMING"
"""``1``: each dispatch also records timing events on the tx and rx streams (``Timing.device_us``), for
the benchmarks' breakdown of where the GPU round trip goes; default off (events cost driver calls)."""


def _int32(value: int) -> int:
    """``value``'s low 32 bits as a signed int32 (how the device words and flags compare them)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


@dataclass(slots=True)
class Timing:
    """One dispatch's hops (``time.time_ns`` of both processes), for the benchmarks' breakdown."""

    published: int
    picked: int = 0
    """The expert rank's poll thread took the descriptor."""
    queue_ns: int = 0
    """Picked -> the expert's compute thread started enqueueing."""
    compute_ns: int = 0
    """The expert host's enqueueing of the computation (not the GPU time)."""
    taken: int = 0
    """This side's poll thread took the completion."""
    settled: int = 0
    """The loop enqueued the copy out and woke the exchange."""
    events: list[Any] | None = None
    """With ``ASAP_GPU_DEVICE_TIMING=1``: timing events on this side's streams: the fill started (tx),
    the request flag written (tx), the done flag seen (rx, after its wait), the copy out over (rx)."""

    def device_us(self) -> dict[str, float]:
        """Device-side hops of a finished dispatch (µs; the events have passed): fill, flag -> done flag
        seen (the expert's part: its start latency plus its computation), copy out."""
        if self.events is None or len(self.events) < 4:
            return {}
        start, flagged, done, copied = self.events
        return {
            "gpu_fill": start.elapsed_time(flagged) * 1e3,
            "gpu_flag_to_done": flagged.elapsed_time(done) * 1e3,
            "gpu_copy_out": done.elapsed_time(copied) * 1e3,
        }


class GpuAttentionLinkEnd(AttentionLinkEnd):
    """An ``AttentionLinkEnd`` whose slots' payload lies in a ``CudaRegion`` (see the module doc)."""

    def __init__(
        self, geometry: LinkGeometry, *, device: torch.device, flags: StreamFlags, **kw: Any
    ) -> None:
        self.device = device
        self.flags = flags
        self.cuda = CudaRegion.create(device, geometry.device_nbytes, label="fast_")
        self._streams = wait_streams(device)
        self.poison_stream = writer(device)
        """Poisons and the region's zeroing: a stream that never waits (``asap.dataplane.gpu_streams``)."""
        with torch.cuda.stream(self.poison_stream):
            self.cuda.buf.zero_()  # flags start at 0: no sequence number has passed
        # once per region: zeroed before the peer looks. On the writer, which no pending wait of this
        # process holds (a synchronize of a shared stream here once queued behind another link's wait)
        self.poison_stream.synchronize()  # type: ignore[no-untyped-call]
        self.tx = self._streams.plain()
        self.rx = self._streams.plain()
        """Copies out enqueued on completions (their done flag already enqueued by the expert)."""
        self.rx_slots: list[torch.cuda.Stream | None] = []
        """Per slot: the wait stream its results are prefetched on (``prefetch``; None: no prefetch,
        the copy out is enqueued on the completion). Empty until the expert attached."""
        self._prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._taken: set[int] = set()
        """Completions taken before their prefetch (which then does nothing)."""
        self._free_after: list[torch.cuda.Event | None] = [None] * geometry.slots
        """Per slot: the copy out of its last results (the next fill waits for it on the GPU)."""
        pinned = torch.zeros(geometry.slots, 3, dtype=torch.int32, pin_memory=True)
        self._words_pinned = list(pinned)
        self._words_host = pinned.numpy()
        self._words_device = [
            self.cuda.view(geometry.device_slot_at(slot) + STEP_WORDS_AT, torch.int32, [3])
            for slot in range(geometry.slots)
        ]
        """Per slot: its step words (rows, layer, seq) in pinned host memory and in the slot."""
        self._lean = lean_fill_enabled()
        """``ASAP_GPU_LEAN_FILL``: slot views cached, the step words and the request flag in one driver
        call, and (hot path) the fill on the caller's stream (``enqueue_fill``)."""
        self._fill_views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """(slot, layout rows) -> that layout's rows, ids and weights views of the slot (lean fill)."""
        self._out_views: dict[int, torch.Tensor] = {}
        """slot -> the view of the slot's rows (results are copied out of its first rows)."""
        self._poisoned = False
        self._gpu_lock = threading.Lock()
        self.timings: deque[Timing] = deque(maxlen=256)
        """The last dispatches' hops (``Timing``)."""
        self._timing: dict[int, Timing] = {}
        self._device_timing = os.environ.get(DEVICE_TIMING_ENV, "0") == "1"
        super().__init__(geometry, **kw)

    def _flag(self, slot: int, at: int) -> int:
        return int(self.cuda.buf.data_ptr()) + self.geometry.device_slot_at(slot) + at

    def _view(self, slot: int, offset: int, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
        return self.cuda.view(self.geometry.device_slot_at(slot) + offset, dtype, dims)

    def announcement(self) -> expert_pb2.DispatchChunk:
        chunk = super().announcement()
        chunk.cuda_region.CopyFrom(self.cuda.announcement())
        return chunk

    def enqueue_fill(
        self,
        slot: int,
        header: SlotHeader,
        dispatch: RankDispatch,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """Write the header (host) and enqueue the rows' copy and the request flag on the tx stream, or
        (lean fill, ``stream`` given: the caller's current stream, on which the dispatch's tensors were
        made) on ``stream``, which then needs no ``record_stream`` for them."""
        if self._lean:
            self._lean_fill(slot, header, dispatch, stream)
            return
        g = self.geometry
        header.write(self._buf, g.slot_at(slot))
        rows, top_k = header.rows, g.top_k
        hidden_at, ids_at, weights_at, _ = g.payload(gpu_layout_rows(g, rows), shape_only=False)
        tx = self.tx
        if dispatch.ready is not None:
            tx.wait_event(dispatch.ready)
        free = self._free_after[slot]
        if free is not None:
            tx.wait_event(free)
        events = self._timing_event(tx, None)
        with torch.cuda.stream(tx):
            for src in (dispatch.hidden, dispatch.expert_ids, dispatch.weights):
                if src.is_cuda:
                    src.record_stream(tx)
            self._view(slot, hidden_at, self.dtype, [rows, g.hidden_size]).copy_(
                dispatch.hidden, non_blocking=True
            )
            self._view(slot, ids_at, torch.int32, [rows, top_k]).copy_(dispatch.expert_ids, non_blocking=True)
            self._view(slot, weights_at, torch.float32, [rows, top_k]).copy_(
                dispatch.weights, non_blocking=True
            )
            # what the expert's captured step checks on the device, from the slot's pinned words (not
            # rewritten before this copy ran: the slot's next fill comes after this dispatch's answer)
            self._words_host[slot] = (rows, header.layer, _int32(header.seq))
            self._words_device[slot].copy_(self._words_pinned[slot], non_blocking=True)
        self.flags.write(tx, self._flag(slot, REQUEST_FLAG_AT), header.seq)
        self._timing[header.seq] = Timing(time.time_ns(), events=self._timing_event(tx, events))

    def _lean_fill(
        self, slot: int, header: SlotHeader, dispatch: RankDispatch, stream: torch.cuda.Stream | None
    ) -> None:
        """``enqueue_fill`` with the fewest host calls: the slot's views for the rows' layout cached,
        three copies (on the hot path, ``stream`` given: the current stream of the end's device, with no
        stream switch), then the step words and the request flag in one ``write_words`` (the flag's write
        carries the barrier that makes the rows and the words visible first)."""
        g = self.geometry
        header.write(self._buf, g.slot_at(slot))
        rows = header.rows
        layout = gpu_layout_rows(g, rows)
        views = self._fill_views.get((slot, layout))
        if views is None:
            hidden_at, ids_at, weights_at, _ = g.payload(layout, shape_only=False)
            views = (
                self._view(slot, hidden_at, self.dtype, [layout, g.hidden_size]),
                self._view(slot, ids_at, torch.int32, [layout, g.top_k]),
                self._view(slot, weights_at, torch.float32, [layout, g.top_k]),
            )
            if layout in BUCKETS:  # (other row counts are laid out as themselves: not kept)
                self._fill_views[(slot, layout)] = views
        own = stream is None
        target = self.tx if stream is None else stream
        if dispatch.ready is not None:
            target.wait_event(dispatch.ready)
        free = self._free_after[slot]
        if free is not None:
            target.wait_event(free)
        events = self._timing_event(target, None)
        sources = (dispatch.hidden, dispatch.expert_ids, dispatch.weights)
        if own:
            with torch.cuda.stream(target):
                for dst, src in zip(views, sources, strict=True):
                    if src.is_cuda:
                        src.record_stream(target)
                    (dst if rows == layout else dst[:rows]).copy_(src, non_blocking=True)
        else:  # ``stream`` is the current stream of the end's device, where a copy into it runs
            for dst, src in zip(views, sources, strict=True):
                (dst if rows == layout else dst[:rows]).copy_(src, non_blocking=True)
        words = self._flag(slot, STEP_WORDS_AT)
        write_words(
            self.flags,
            target,
            [
                (words, rows),
                (words + 4, header.layer),
                (words + 8, header.seq),
                (self._flag(slot, REQUEST_FLAG_AT), header.seq),
            ],
        )
        self._timing[header.seq] = Timing(time.time_ns(), events=self._timing_event(target, events))

    def _timing_event(self, stream: torch.cuda.Stream, events: list[Any] | None) -> list[Any] | None:
        """With device timing on: a timing event recorded on ``stream``, appended to ``events``."""
        if not self._device_timing:
            return None
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record(stream)
        return [*(events or []), event]

    def prefetch(self, slot: int, seq: int, rows: int) -> None:
        """Right after publishing ``seq``: enqueue on the slot's own wait stream the wait for its done
        flag and the copy of its results out of the slot, so the copy runs as soon as the expert's stream
        writes the flag, with no host in between, and the enqueueing is done while the expert works
        (``_take`` then only hands the result on). Only once the expert attached (its heartbeat seen):
        before that the done flag would wait on this host sending the announcement, and a wait must
        never depend on this process (``asap.dataplane.gpu_streams``); on a stream of its own, so no
        other work queues behind it. Without one, nothing is prefetched."""
        with self._gpu_lock:
            if self._poisoned or seq in self._taken:  # the completion came first (``_take`` copied)
                self._taken.discard(seq)
                return
            rx = self._rx_slot(slot)
            if rx is not None:
                self._prefetched[seq] = self._copy_out(rx, slot, seq, rows)

    def _rx_slot(self, slot: int) -> torch.cuda.Stream | None:
        """Under ``_gpu_lock``: ``slot``'s wait stream, taken on the first prefetch after the expert
        attached (None: not attached yet, prefetch off, or no stream with a queue of its own)."""
        if not self.rx_slots:
            if not prefetch_enabled() or not heartbeat(self._buf, HEARTBEAT_EXPERT):
                return None
            self.rx_slots = [self._streams.take() for _ in range(self.geometry.slots)]
        return self.rx_slots[slot]

    def _copy_out(
        self, rx: torch.cuda.Stream, slot: int, seq: int, rows: int
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Under ``_gpu_lock``: on ``rx``, wait for the slot's done flag and copy the results out; the
        slot's next fill waits for that copy on the GPU (the result carries its event)."""
        self.flags.wait(rx, self._flag(slot, DONE_FLAG_AT), seq)
        timing = self._timing.get(seq)
        if timing is not None and timing.events is not None:
            timing.events = self._timing_event(rx, timing.events)
        g = self.geometry
        with torch.cuda.stream(rx):
            if self._lean:
                full = self._out_views.get(slot)
                if full is None:
                    most = g.max_rows(shape_only=False)
                    hidden_at = g.payload(most, shape_only=False)[0]
                    full = self._out_views[slot] = self._view(
                        slot, hidden_at, self.dtype, [most, g.hidden_size]
                    )
                src = full[:rows]
            else:
                hidden_at = g.payload(rows, shape_only=False)[0]
                src = self._view(slot, hidden_at, self.dtype, [rows, g.hidden_size])
            result = torch.empty_like(src)
            result.copy_(src, non_blocking=True)
        event = torch.cuda.Event(enable_timing=self._device_timing)  # type: ignore[no-untyped-call]
        event.record(rx)
        if timing is not None and timing.events is not None:
            timing.events.append(event)
        self._free_after[slot] = event  # read by the next fill of the slot, after the settle
        return result, event

    def early_result(self, seq: int) -> tuple[torch.Tensor, torch.cuda.Event] | None:
        """The results of ``seq`` prefetched at publication (their event passes once the expert's done
        flag, or a poison, let the copy run), or None (not prefetched, or already taken). For settling a
        ticket before the completion (``ASAP_GPU_HOST_FREE``): call it under ``pending_lock``."""
        with self._gpu_lock:
            return self._prefetched.get(seq)

    @property
    def pending_lock(self) -> AbstractContextManager[Any]:
        """The lock under which a dispatch's answer is delivered (``_deliver`` pops it under it): an
        early settle made under it is never interleaved with the answer's settle."""
        return self._lock

    def is_pending(self, seq: int) -> bool:
        """Under ``pending_lock``: whether ``seq`` still waits for its answer."""
        return seq in self._pending

    def _take(self, completion: Completion, now_ns: int) -> None:
        """On the poll thread, before the slot can be handed on: the results' copy out, prefetched at
        publication (or enqueued here if the completion came first: the rx stream waits for the
        expert's done flag, written after errors too, then copies) is handed on with its event."""
        with self._lock:
            pending = self._pending.get(completion.seq)
        if pending is None:
            super()._take(completion, now_ns)  # logs the unknown completion
            return
        ok = not completion.status and completion.rows == pending.rows
        with self._gpu_lock:
            if self._poisoned:
                return  # the link broke meanwhile: the dispatch has failed already
            copied = self._prefetched.pop(pending.seq, None)
            if copied is None:
                self._taken.add(pending.seq)
                copied = self._copy_out(self.rx, pending.slot, pending.seq, pending.rows)
        timing = self._timing.pop(completion.seq, None)
        if not ok:
            super()._take(completion, now_ns)  # the base's error outcomes
            return
        result, event = copied
        if timing is not None:
            timing.picked, timing.taken = completion.picked_unix_ns, time.time_ns()
            timing.queue_ns, timing.compute_ns = completion.queue_ns, completion.compute_ns
            self.timings.append(timing)
        self._deliver(pending, attach_ready(result, event))

    def _settle(self, pending: PendingDispatch, outcome: Outcome) -> None:
        timing = self.timings[-1] if self.timings else None
        if timing is not None and not timing.settled:
            timing.settled = time.time_ns()
        super()._settle(pending, outcome)

    def poison(self) -> None:
        """Release every stream waiting on a flag of this region (peer dead, or the region retired)."""
        with self._gpu_lock:
            if self._poisoned or self.cuda.size == 0:
                return
            self._poisoned = True
            self._prefetched.clear()
            value = poison_value(self._seq)
            stream = self.poison_stream
            for slot in range(self.geometry.slots):
                self.flags.write(stream, self._flag(slot, REQUEST_FLAG_AT), value)
                self.flags.write(stream, self._flag(slot, DONE_FLAG_AT), value)

    def fail(self, error: AsapError) -> None:
        self.poison()
        super().fail(error)

    def close(self) -> None:
        """Poison (every wait of the region passes), then give the wait streams back once they drained
        (``gpu_streams``: bounded), then free the region."""
        self.poison()
        super().close()
        self._fill_views.clear()  # (they hold the region's memory)
        self._out_views.clear()
        for stream in self.rx_slots:
            if stream is not None:
                self._streams.give_back(stream)
        self.rx_slots = []
        buf = self.cuda.buf
        if buf.numel():
            for stream in (self.tx, self.rx):  # the memory outlives the copies queued on them
                buf.record_stream(stream)
            self.cuda.close()
        for stream in (self.tx, self.rx):
            self._streams.give_back(stream)
