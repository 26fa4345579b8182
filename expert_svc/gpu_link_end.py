"""One attached GPU fast link of an expert rank (the lane that serves its links: ``expert_svc.gpu_fastlane``).

Its slots lie in the attention rank's CUDA IPC memory: a descriptor is checked as on CPU ranks and turned
into views of its slot's rows, ids and weights (laid out by ``gpu_layout_rows``); the results go back over
the rows and the slot's done flag is written on the compute stream. When the peer is gone the link's
flags are poisoned, so neither side's streams stay blocked on a flag that will not be written.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from asap.dataplane.cuda_ipc import CudaAttachments
from asap.dataplane.fastlink import DONE_FLAG_AT, HEARTBEAT_EXPERT, REQUEST_FLAG_AT, Request, SlotHeader, beat
from asap.dataplane.gpu_flags import poison_value
from asap.dataplane.gpu_layout import gpu_layout_rows
from asap.errors import InvalidArgument
from asap.v1 import common_pb2, expert_pb2
from expert_svc.fastlane import ExpertLinkEnd, _Item
from expert_svc.gpu_graph import StepKey, graph_buckets

if TYPE_CHECKING:
    from expert_svc.gpu_fastlane import GpuFastLane

__all__ = ["GpuExpertLinkEnd"]

logger = logging.getLogger(__name__)


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
                self.graphs = steps.capture(self.slots_buf, self.geometry, self.buckets, self._beat)
                logger.info(
                    "GPU fast link: %d expert steps captured (buckets %s) in %.0f ms",
                    len(self.graphs),
                    list(self.buckets),
                    (time.monotonic() - started) * 1e3,
                )
            except Exception:  # the eager path serves the link: slower, never wrong
                logger.exception("capturing the expert steps of a GPU fast link failed; eager steps")
                self.buckets, self.graphs = (), {}

    def _beat(self) -> None:
        """The heartbeat while the steps are captured (the poll thread does not serve the link yet)."""
        beat(self._buf, HEARTBEAT_EXPERT, time.monotonic_ns())

    def _take(self, request: Request, now_ns: int) -> None:
        item = self._admit(request, lambda: self._item(request, now_ns))
        if item is None:
            return
        if request.not_before_ns > now_ns:
            self._delayed.hold(item)
        elif not self.lane.step(item):
            self.lane.enqueue(item)

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
        rows, top_k = request.rows, g.top_k
        hidden_at, ids_at, weights_at, _ = g.payload(gpu_layout_rows(g, rows), shape_only=False)
        return _Item(
            self,
            request,
            header,
            request.layer,
            self._view(request.slot, hidden_at, self.lane.dtype, [rows, g.hidden_size]),
            self._view(request.slot, ids_at, torch.int32, [rows, top_k]),
            self._view(request.slot, weights_at, torch.float32, [rows, top_k]),
            time.time_ns(),
            now_ns,
        )

    def _write_back(self, request: Request, out: torch.Tensor | None, valid_slot: bool) -> None:
        if not valid_slot or self._poisoned:
            return
        stream = self.lane.stream
        g = self.geometry
        if out is not None and request.rows:
            hidden_at = g.payload(request.rows, shape_only=False)[0]
            with torch.cuda.stream(stream):
                dst = self._view(request.slot, hidden_at, self.lane.dtype, [request.rows, g.hidden_size])
                dst.copy_(out, non_blocking=True)
        self.lane.flags.write(stream, self.flag(request.slot, DONE_FLAG_AT), request.seq)

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
        super()._close()
        self.lane.retire(self.graphs)  # launches may still be queued on the stream
        self.graphs = {}
        self.slots_buf = torch.empty(0, dtype=torch.uint8)
        self._attachments.close()
