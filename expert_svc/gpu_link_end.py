"""One attached GPU fast link of an expert rank (the lane that serves its links: ``expert_svc.gpu_fastlane``).

Its slots lie in the attention rank's CUDA IPC memory: a descriptor is checked as on CPU ranks and turned
into views of its slot's rows, ids and weights (laid out by ``gpu_layout_rows``); the results go back over
the rows and the slot's done flag is written on the compute stream. When the peer is gone the link's
flags are poisoned, so neither side's streams stay blocked on a flag that will not be written.

Armed steps (default on with captured steps, ``ASAP_GPU_ARMED_STEPS=0`` turns them off): each slot has a stream of its
own on which the slot's *next* step is enqueued before its descriptor arrives: a wait for the request
flag to pass the slot's last sequence number, then the captured step of the slot's last (bucket,
window). The attention stream's flag write starts the expert computation with no host in between; the
step checks the slot's words on the device and does nothing when they name another bucket or window
(the host, on the descriptor, then launches the right graph behind it on the same stream) or when the
flag was poisoned. Every done flag of such a link is written on the slot's stream, after the armed step,
and the slot is re-armed before the completion is published, so the next descriptor always finds the
slot's state as the stream has it. ``_armed[slot]``: the key of the step pending on the slot's stream
(None: nothing pending); any request of the slot consumes it. With ``ASAP_GPU_DEVICE_DONE=1``, where the
slots lie on this GPU, the step also writes the done flag itself right after the results, so the
attention's prefetched copy out starts when the step ends, not when this host took the descriptor.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from asap.dataplane.cuda_ipc import CudaAttachments
from asap.dataplane.fastlink import DONE_FLAG_AT, HEARTBEAT_EXPERT, REQUEST_FLAG_AT, Request, SlotHeader, beat
from asap.dataplane.gpu_flags import poison_value
from asap.dataplane.gpu_layout import armed_steps_enabled, device_done_enabled, gpu_layout_rows
from asap.dataplane.gpu_streams import wait_streams
from asap.errors import InvalidArgument
from asap.v1 import common_pb2, expert_pb2
from expert_svc.fastlane import ExpertLinkEnd, _Item
from expert_svc.gpu_graph import StepKey, graph_buckets

if TYPE_CHECKING:
    from expert_svc.gpu_fastlane import GpuFastLane

__all__ = ["GpuExpertLinkEnd"]

logger = logging.getLogger(__name__)

_NO_VIEW = torch.empty(0)
"""An item's rows, ids and weights until the eager path asks for its views (``_with_views``)."""


class GpuExpertLinkEnd(ExpertLinkEnd):
    """One attached GPU fast link: the shared-memory region (rings, headers) and the slots' GPU memory."""

    lane: GpuFastLane

    def __init__(
        self, lane: GpuFastLane, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion
    ) -> None:
        self._attachments = CudaAttachments()
        self._attachments.announce(cuda_region)
        self.slots_buf = self._attachments.buffer(cuda_region.name)
        self._last_seq = 0
        self._poisoned = False
        self.buckets: tuple[int, ...] = ()
        self.graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        """The captured steps of this link's slots (``expert_svc.gpu_graph``), made before it is served."""
        self.arm_streams: list[torch.cuda.Stream] = []
        """Per slot, the stream its armed steps run on (empty: steps are not armed on this link)."""
        self._armed: list[StepKey | None] = []
        self._armed_after: list[torch.cuda.Event | None] = []
        """Per slot: recorded after its armed step (the eager path waits for it before using the slot)."""
        self._launched: dict[int, StepKey] = {}
        """seq -> the captured step that computes it on its slot's stream (re-armed with that key)."""
        self._rearm: tuple[int, StepKey, int] | None = None
        """(slot, key, seq) to arm once the completion is published (``rearm``, on the poll thread)."""
        try:
            super().__init__(lane, link)
        except BaseException:
            self._attachments.close()
            raise
        if int(self.slots_buf.numel()) < self.geometry.device_nbytes:
            self._close()
            raise InvalidArgument(
                f"fast link GPU memory of {self.slots_buf.numel()} bytes for slots of {self.geometry.device_nbytes}"
            )
        steps = lane.steps
        if steps is not None:
            try:
                started = time.monotonic()
                self.buckets = graph_buckets(self.geometry, steps.largest)
                armed = armed_steps_enabled() and bool(self.buckets)
                same_gpu = self.slots_buf.device == torch.device(lane.device)  # (ordering across GPUs)
                self.graphs = steps.capture(
                    self.slots_buf,
                    self.geometry,
                    self.buckets,
                    self._beat,
                    pool_per_slot=armed,
                    device_done=armed and same_gpu and device_done_enabled(),
                )
                if armed:
                    self._take_arm_streams()
                logger.info(
                    "GPU fast link: %d expert steps captured (buckets %s) in %.0f ms",
                    len(self.graphs),
                    list(self.buckets),
                    (time.monotonic() - started) * 1e3,
                )
            except Exception:  # the eager path serves the link: slower, never wrong
                logger.exception("capturing the expert steps of a GPU fast link failed; eager steps")
                self.buckets, self.graphs, self.arm_streams = (), {}, []

    def _take_arm_streams(self) -> None:
        """One wait stream per slot (``asap.dataplane.gpu_streams``: a hardware queue of its own, so an
        armed wait holds nothing else); if any slot gets none, the link is not armed (all given back)."""
        pool = wait_streams(torch.device(self.lane.device))
        streams = [pool.take() for _ in range(self.geometry.slots)]
        if any(s is None for s in streams):
            for stream in streams:
                if stream is not None:
                    pool.give_back(stream)
            logger.warning("GPU fast link: no wait streams left for armed steps; launched on arrival")
            return
        slots = self.geometry.slots
        self.arm_streams = [s for s in streams if s is not None]
        self._armed, self._armed_after = [None] * slots, [None] * slots

    def _beat(self) -> None:
        """The heartbeat while the steps are captured (the poll thread does not serve the link yet)."""
        beat(self._buf, HEARTBEAT_EXPERT, time.monotonic_ns())

    def _take(self, request: Request, now_ns: int) -> None:
        item = self._admit(request, lambda: self._item(request, now_ns))
        if item is None:
            return
        if request.not_before_ns > now_ns:
            self._delayed.hold(self._with_views(item))
        elif not self.lane.step(item):  # a captured step reads the slot itself: no views needed
            self.lane.enqueue(self._with_views(item))

    def flag(self, slot: int, at: int) -> int:
        return int(self.slots_buf.data_ptr()) + self.geometry.device_slot_at(slot) + at

    def _view(self, slot: int, offset: int, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
        start = self.geometry.device_slot_at(slot) + offset
        nbytes = dims[0] * dims[1] * dtype.itemsize
        return self.slots_buf[start : start + nbytes].view(dtype).view(dims)

    def _item(self, request: Request, now_ns: int) -> _Item:
        g = self.geometry
        request.check(g)
        if request.shape_only:
            raise InvalidArgument("a dispatch without row values on a GPU fast link")
        header = SlotHeader.read(self._buf, g.slot_at(request.slot), request)
        self.lane.check_layer(request.layer)
        self._last_seq = max(self._last_seq, request.seq)
        return _Item(
            self, request, header, request.layer, _NO_VIEW, _NO_VIEW, _NO_VIEW, time.time_ns(), now_ns
        )

    def _with_views(self, item: _Item) -> _Item:
        """``item`` with its views of the slot's rows, ids and weights (for the eager path)."""
        g, request = self.geometry, item.request
        rows, top_k = request.rows, g.top_k
        hidden_at, ids_at, weights_at, _ = g.payload(gpu_layout_rows(g, rows), shape_only=False)
        item.hidden = self._view(request.slot, hidden_at, self.lane.dtype, [rows, g.hidden_size])
        item.expert_ids = self._view(request.slot, ids_at, torch.int32, [rows, top_k])
        item.weights = self._view(request.slot, weights_at, torch.float32, [rows, top_k])
        return item

    def launch(self, slot: int, key: StepKey, seq: int) -> bool:
        """On the poll thread, under the lane's launch lock: have ``key``'s captured step compute the
        dispatch ``seq`` of ``slot``; False if there is none (the eager path). On an armed link the slot's
        armed step computes it if its key is ``key`` (nothing to enqueue: the hit); else the graph goes
        on the slot's stream behind it (after the flag wait where nothing was armed)."""
        graph = self.graphs.get(key)
        if graph is None:
            return False
        if not self.arm_streams:
            stream = self.lane.stream
            self.lane.flags.wait(stream, self.flag(slot, REQUEST_FLAG_AT), seq)
            self.lane.replay(graph, stream)
            return True
        armed = self._armed[slot]
        if armed == key:
            self.lane.armed_hits += 1
        else:
            stream = self.arm_streams[slot]
            if armed is None:
                self.lane.flags.wait(stream, self.flag(slot, REQUEST_FLAG_AT), seq)
            else:
                self.lane.armed_misses += 1
            self.lane.replay(graph, stream)
        self._launched[seq] = key
        return True

    def armed_after(self, slot: int) -> torch.cuda.Event | None:
        """For the eager path: the event after the slot's armed step (None if nothing is armed)."""
        if not self.arm_streams or slot >= len(self._armed_after) or self._armed[slot] is None:
            return None
        return self._armed_after[slot]

    def _arm(self, slot: int, key: StepKey, seq: int) -> None:
        """Enqueue ``slot``'s next step (``key``) on its stream: it runs once the request flag passes
        ``seq``; the device check makes it a no-op for another bucket or window, or a poisoned flag."""
        graph = self.graphs.get(key)
        stream = self.arm_streams[slot]
        if graph is None:
            self._armed[slot] = None
            return
        self.lane.flags.wait(stream, self.flag(slot, REQUEST_FLAG_AT), seq + 1)
        self.lane.replay(graph, stream)
        self._armed[slot], self._armed_after[slot] = key, self.lane.mark(stream)

    def _write_back(self, request: Request, out: torch.Tensor | None, valid_slot: bool) -> None:
        if not valid_slot or self._poisoned:
            self._launched.pop(request.seq, None)
            return
        stream = self.lane.stream
        g = self.geometry
        if out is not None and request.rows:
            hidden_at = g.payload(request.rows, shape_only=False)[0]
            with torch.cuda.stream(stream):
                dst = self._view(request.slot, hidden_at, self.lane.dtype, [request.rows, g.hidden_size])
                dst.copy_(out, non_blocking=True)
        if not self.arm_streams:
            self.lane.flags.write(stream, self.flag(request.slot, DONE_FLAG_AT), request.seq)
            return
        slot, key = request.slot, self._launched.pop(request.seq, None)
        armed = self.arm_streams[slot]
        if key is None:  # the compute thread's stream had the slot (eager step, or an error answer)
            self.lane.order(armed, stream)
        self.lane.flags.write(armed, self.flag(slot, DONE_FLAG_AT), request.seq)
        self._armed[slot] = None  # consumed by this dispatch
        if key is not None:  # re-armed by the poll thread once the completion is out (``rearm``)
            self._rearm = (slot, key, request.seq)

    def rearm(self) -> None:
        """On the poll thread, right after a captured step's answer: arm its slot's next step. After the
        completion, so the launch is off the round trip; the next descriptor of the slot is taken by
        this same thread, after this (if the flag is already written, the armed step just runs)."""
        with self._lock:
            pending, self._rearm = self._rearm, None
            if pending is not None and not self._closed and not self._poisoned:
                self._arm(*pending)

    def poison(self) -> None:
        """Release the compute stream from waits on this link's request flags (and the peer's streams
        from its done flags): its peer is gone or retired the region."""
        with self._lock:
            if self._poisoned or self._closed:
                return
            self._poisoned = True
        value = poison_value(self._last_seq)
        stream = self.lane.poison_stream
        for slot in range(self.geometry.slots):
            self.lane.flags.write(stream, self.flag(slot, REQUEST_FLAG_AT), value)
            self.lane.flags.write(stream, self.flag(slot, DONE_FLAG_AT), value)

    def detach(self) -> None:
        self.poison()
        super().detach()

    def _close(self) -> None:
        if self.arm_streams:  # nothing armed may stay waiting on a flag no one will write
            self.poison()
        super()._close()
        pool = wait_streams(torch.device(self.lane.device)) if self.arm_streams else None
        for stream in self.arm_streams:  # the flags are poisoned: armed steps drain (bounded), then unmap
            assert pool is not None
            pool.give_back(stream)
        self.arm_streams = []
        self.lane.retire(self.graphs)  # launches may still be queued on the stream
        self.graphs = {}
        self.slots_buf = torch.empty(0, dtype=torch.uint8)
        self._attachments.close()
