"""``fast`` on GPU ranks: the per-layer exchange of same-host GPU ranks through the descriptor rings, with
the slots' payload in CUDA IPC memory and ready flags written and waited on by CUDA streams (DESIGN §9).

Per dispatch, nothing waits for a GPU on either host:

1. the event loop enqueues on the link's *tx* stream: wait for the rows (``dispatch.ready``) and for the
   slot's previous results to be copied out, copy rows, ids and weights into the slot, write the slot's
   request flag = seq; then it publishes the descriptor (rows, layer, seq: the counts the expert's host
   needs) in the request ring and returns to the loop;
2. the expert rank's poll thread takes the descriptor and enqueues a wait for the request flag, the
   expert step captured for the slot and the rows' bucket (one graph launch: the results over the rows)
   and the slot's done flag = seq, and publishes the completion (status only) at once; other shapes go to
   its compute thread, which enqueues the same eagerly (``expert_svc.gpu_fastlane``, ``gpu_graph``);
3. this side's poll thread takes the completion; on the loop the *rx* stream waits for the done flag and
   copies the results out of the slot; the result tensor carries that copy's event
   (``asap.devices.attach_ready``), which ``combine`` waits for on the compute stream.

A slot's payload is laid out for the rows' token bucket (``gpu_layout_rows``), so the captured step's
views of a slot are fixed per bucket. With ``ASAP_GPU_HOT_PATH=1`` the attention compute thread does
step 1 itself and takes its completions (``direct``, ``asap.dataplane.direct``) instead of the loop.

Every wait is for a flag whose write the peer had already enqueued, so no two streams wait on each other.
A peer that dies with work enqueued never writes its flags: the host that learns of it (stream break,
heartbeat older than the bound) poisons every flag of the region (``asap.dataplane.gpu_flags``), so all
streams drain, fails the waiting dispatches with ``Unavailable`` and retires the region.

Known gap: a peer that dies after publishing a completion but before its GPU work ran leaves results
the stream copies out unwritten (the poison releases the copy); only dispatches still waiting fail.
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from asap.dataplane.cuda_ipc import CudaRegion
from asap.dataplane.direct import Ticket
from asap.dataplane.fast import DEFAULT_PEER_TIMEOUT_S, DEFAULT_SLOTS, FastPlane, _Direct
from asap.dataplane.fast_attention import ATTACH_S, AttentionLinkEnd, Outcome, _Pending
from asap.dataplane.fastlink import DONE_FLAG_AT, REQUEST_FLAG_AT, Completion, LinkGeometry, SlotHeader
from asap.dataplane.gpu_flags import StreamFlags, driver_flags, poison_value
from asap.dataplane.plane import DataPlane, ExchangeResult, LinkSpec, PlaneRequest
from asap.dataplane.poller import OnePerProcess, PollThread
from asap.dataplane.ring import Backoff
from asap.devices import attach_ready, attached_ready
from asap.errors import AsapError, InternalError, Unavailable
from asap.model.grouped import BUCKETS, bucket_for
from asap.model.placement import RankDispatch
from asap.v1 import expert_pb2

__all__ = [
    "DEFAULT_GPU_SLOT_BYTES",
    "GPU_HOT_PATH_ENV",
    "GPU_POLL_SPIN_S",
    "GpuAttentionLinkEnd",
    "GpuFastPlane",
    "Timing",
    "gpu_hot_path_enabled",
    "gpu_layout_rows",
    "gpu_poller",
    "gpu_slot_bytes_for",
]

DEFAULT_GPU_SLOT_BYTES = 72 * 1024 * 1024
"""Bytes per GPU slot: 16k rows at hidden 2048 or 8k at 4096 in bf16, with top-8 ids and weights."""
GPU_POLL_SPIN_S = float(os.environ.get("ASAP_GPU_POLL_SPIN_S", "0"))
"""How long the GPU fast plane's poll threads spin before they park on the doorbells (default: not at
all). Measured on one H200 host: a 2 ms spin made every hand-off between the threads of a process wait
for the GIL (the spinning thread holds it but for the 5 ms switch interval): 6.5 ms round trips against
1.7 ms parked."""

GPU_HOT_PATH_ENV = "ASAP_GPU_HOT_PATH"
"""``1``: GPU fast links offer the attention rank's hot path (``asap.dataplane.direct``: the compute
thread enqueues the fill and publishes, and takes its completions itself); default off, so async
batches on GPU links take ``exchange`` through the event loop."""


def gpu_hot_path_enabled(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(GPU_HOT_PATH_ENV, "0").strip().lower()
    return value in ("1", "on", "true", "yes")


_POLLER = OnePerProcess(
    lambda: PollThread("gpu-fast-completions", backoff=lambda: Backoff(spin_s=GPU_POLL_SPIN_S))
)


def gpu_poller() -> PollThread:
    """The attention process's poll thread for the completions of its GPU fast links (it spins)."""
    return _POLLER.get()


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


def gpu_layout_rows(geometry: LinkGeometry, rows: int) -> int:
    """The row count a GPU slot's payload is laid out for (``LinkGeometry.payload``) when it carries
    ``rows`` rows: the next token bucket where that fits the slot, else ``rows``. Both ends lay out by
    it, so a slot's ids and weights lie where the expert rank's captured step for the bucket reads them
    (``expert_svc.gpu_graph``); the rows past ``rows`` are left as they were."""
    bucket = bucket_for(rows)
    if (
        rows <= 0
        or bucket not in BUCKETS
        or geometry.payload(bucket, shape_only=False)[3] > geometry.slot_bytes
    ):
        return rows
    return bucket


def gpu_slot_bytes_for(spec: LinkSpec, slots: int) -> int:
    size = spec.region_bytes // slots if spec.region_bytes else DEFAULT_GPU_SLOT_BYTES
    return max(8192, size // 4096 * 4096)


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

    def _settle(self, pending: _Pending, outcome: Outcome) -> None:
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


class GpuFastPlane(FastPlane):
    """The ``fast`` plane of a GPU link (see the module doc); ``inner`` (``cuda-ipc``) carries the
    sync-mode dispatches and those larger than a slot."""

    device_slots = True

    def __init__(
        self,
        spec: LinkSpec,
        stream: Any,
        codec: Executor,
        inner: DataPlane,
        *,
        slots: int = DEFAULT_SLOTS,
        peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S,
        attach_s: float = ATTACH_S,
        flags: StreamFlags | None = None,
    ) -> None:
        super().__init__(
            spec, stream, codec, inner, slots=slots, peer_timeout_s=peer_timeout_s, attach_s=attach_s
        )
        self.flags = flags if flags is not None else driver_flags()

    def _slot_bytes(self) -> int:
        return gpu_slot_bytes_for(self.spec, self.slots)

    def _end_for(self, session: object, geometry: LinkGeometry) -> AttentionLinkEnd:
        end = self._end
        if end is not None and end.broken is None and self._session is session and end.geometry is geometry:
            return end
        if end is not None:
            end.fail(Unavailable(f"{self.stream.peer}: fast link replaced"))
        spec = self.spec
        end = GpuAttentionLinkEnd(
            geometry,
            device=spec.device,
            flags=self.flags,
            attention_rank=spec.attention_rank,
            expert_rank=spec.expert_rank,
            dtype=spec.dtype,
            peer=self.stream.peer,
            peer_timeout_s=self.peer_timeout_s,
            attach_s=self.attach_s,
            loop=asyncio.get_running_loop(),
            poller=gpu_poller(),
        )
        session.send(end.announcement())  # type: ignore[attr-defined]
        self._end, self._session = end, session
        return end

    def direct(self, top_k: int) -> _GpuDirect | None:  # type: ignore[override]
        """The hot path for one batch where ``ASAP_GPU_HOT_PATH`` is on (on the event loop, at its
        start), else None: the batch takes ``exchange`` through the event loop."""
        if not gpu_hot_path_enabled():
            return None
        end = self._end_for(self.stream.open(), self._geometry(top_k))
        assert isinstance(end, GpuAttentionLinkEnd)
        return _GpuDirect(self, end, asyncio.get_running_loop())

    async def exchange(self, request: PlaneRequest) -> ExchangeResult:
        geometry = self._geometry(int(request.dispatch.expert_ids.shape[1]))
        if request.sync is not None or request.rows == 0 or request.rows > self.max_rows:
            return await self.inner.exchange(request)
        end = self._end_for(self.stream.open(), geometry)
        assert isinstance(end, GpuAttentionLinkEnd)
        slot = await end.take_slot()
        seq = 0
        try:
            header = end.header(
                request.micro_batch,
                request.layer,
                request.rows,
                request.traceparent,
                request.tracestate,
                slot,
            )
            end.enqueue_fill(slot, header, request.dispatch)
            seq, future = end.publish(
                slot, request.micro_batch, request.layer, request.rows, shape_only=False, link_s=0.0
            )
            self._hidden_bytes += request.rows * self.spec.hidden_size * self.spec.dtype.itemsize
            self.fast_exchanges += 1
            request.sent()
            assert future is not None  # no ticket given: the result comes on the event loop
            hidden = await future
            return ExchangeResult(hidden, ready=attached_ready(hidden))
        finally:
            if seq == 0:
                end.give_back(slot)
            else:
                end.abandon(seq)


class _GpuDirect(_Direct):
    """``DirectLink`` of a GPU fast link for one batch: the compute thread enqueues the slot's fill and
    request flag on the tx stream and publishes; completions are taken by whichever thread polls (the
    result carries its copy's event, which ``combine`` waits for on the compute stream)."""

    end: GpuAttentionLinkEnd

    def post(self, request: PlaneRequest, ticket: Ticket) -> None:
        plane, end = self.plane, self.end
        if request.rows == 0 or request.rows > plane.max_rows:  # the inner plane, via the loop
            self._post_inner(request, ticket)
            return
        slot = end.take_slot_blocking(ticket)
        seq = 0
        try:
            end.enqueue_fill(slot, plane._header(end, slot, request), request.dispatch)
            seq, _ = plane._publish(end, slot, request, ticket)
        except (ValueError, IndexError, TypeError, struct.error) as exc:  # the region retired under the fill
            if end.broken is not None:
                raise end.broken from None
            raise InternalError(f"{end.peer}: filling a GPU fast link slot failed: {exc}") from exc
        finally:
            if seq == 0:
                end.give_back(slot)
        ticket.plane_data = seq
