"""The attention end of a GPU fast link: its slots' payload in a ``CudaRegion``, filled and copied out
by CUDA streams that write and wait on the slots' flags (the protocol: ``asap.dataplane.gpu_fast``).

The event loop or a hot-path compute thread enqueues a dispatch's fill and request flag on the *tx*
stream; the poll thread, on a completion, has the *rx* stream wait for the done flag and copy the results
out, and the slot's next fill waits for that copy on the GPU. A broken or retired link poisons every flag
of the region, so no stream is left waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from asap.dataplane.cuda_ipc import CudaRegion
from asap.dataplane.fast_attention import AttentionLinkEnd
from asap.dataplane.fastlink import DONE_FLAG_AT, REQUEST_FLAG_AT, Completion, LinkGeometry, SlotHeader
from asap.dataplane.gpu_flags import StreamFlags, poison_value
from asap.dataplane.gpu_layout import gpu_layout_rows
from asap.dataplane.pending import Outcome, PendingDispatch
from asap.devices import attach_ready
from asap.errors import AsapError
from asap.model.placement import RankDispatch
from asap.v1 import expert_pb2

__all__ = ["GpuAttentionLinkEnd", "Timing"]


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


class GpuAttentionLinkEnd(AttentionLinkEnd):
    """An ``AttentionLinkEnd`` whose slots' payload lies in a ``CudaRegion`` (see the module doc)."""

    def __init__(
        self, geometry: LinkGeometry, *, device: torch.device, flags: StreamFlags, **kw: Any
    ) -> None:
        self.device = device
        self.flags = flags
        self.cuda = CudaRegion.create(device, geometry.device_nbytes, label="fast_")
        self.cuda.buf.zero_()  # flags start at 0: no sequence number has passed
        torch.cuda.current_stream(device).synchronize()  # once per region: zero before the peer looks
        self.tx = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.rx = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.poison_stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.tx.wait_stream(torch.cuda.current_stream(device))  # the zeroed flags first
        self._free_after: list[torch.cuda.Event | None] = [None] * geometry.slots
        """Per slot: the copy out of its last results (the next fill waits for it on the GPU)."""
        self._poisoned = False
        self._gpu_lock = threading.Lock()
        self.timings: deque[Timing] = deque(maxlen=256)
        """The last dispatches' hops (``Timing``)."""
        self._timing: dict[int, Timing] = {}
        super().__init__(geometry, **kw)

    def _flag(self, slot: int, at: int) -> int:
        return int(self.cuda.buf.data_ptr()) + self.geometry.device_slot_at(slot) + at

    def _view(self, slot: int, offset: int, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
        return self.cuda.view(self.geometry.device_slot_at(slot) + offset, dtype, dims)

    def announcement(self) -> expert_pb2.DispatchChunk:
        chunk = super().announcement()
        chunk.cuda_region.CopyFrom(self.cuda.announcement())
        return chunk

    def enqueue_fill(self, slot: int, header: SlotHeader, dispatch: RankDispatch) -> None:
        """Write the header (host) and enqueue the rows' copy and the request flag on the tx stream."""
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
        self.flags.write(tx, self._flag(slot, REQUEST_FLAG_AT), header.seq)
        self._timing[header.seq] = Timing(time.time_ns())

    def _take(self, completion: Completion, now_ns: int) -> None:
        """On the poll thread, before the slot can be handed on: the rx stream waits for the expert's done
        flag (after errors too: the expert writes it once its GPU work of the slot is over) and copies the
        results out; the slot's next fill waits for that copy on the GPU, the result carries its event."""
        with self._lock:
            pending = self._pending.get(completion.seq)
        if pending is None:
            super()._take(completion, now_ns)  # logs the unknown completion
            return
        ok = not completion.status and completion.rows == pending.rows
        timing = self._timing.pop(completion.seq, None)
        with self._gpu_lock:
            if self._poisoned:
                return  # the link broke meanwhile: the dispatch has failed already
            rx = self.rx
            self.flags.wait(rx, self._flag(pending.slot, DONE_FLAG_AT), pending.seq)
            result = None
            if ok:
                g = self.geometry
                with torch.cuda.stream(rx):
                    hidden_at = g.payload(pending.rows, shape_only=False)[0]
                    src = self._view(pending.slot, hidden_at, self.dtype, [pending.rows, g.hidden_size])
                    result = torch.empty_like(src)
                    result.copy_(src, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(rx)
            self._free_after[pending.slot] = event  # read by the loop after the settle below
        if result is None:
            super()._take(completion, now_ns)  # the base's error outcomes
            return
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
            value = poison_value(self._seq)
            stream = self.poison_stream
            for slot in range(self.geometry.slots):
                self.flags.write(stream, self._flag(slot, REQUEST_FLAG_AT), value)
                self.flags.write(stream, self._flag(slot, DONE_FLAG_AT), value)

    def fail(self, error: AsapError) -> None:
        self.poison()
        super().fail(error)

    def close(self) -> None:
        self.poison()
        super().close()
        buf = self.cuda.buf
        if buf.numel():
            for stream in (self.tx, self.rx):  # the memory outlives the copies still queued on them
                buf.record_stream(stream)
            self.cuda.close()
