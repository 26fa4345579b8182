"""The expert rank's end of its NIXL links (DESIGN.md §10): one poll thread takes the request
notifications of every link, validates them as the fast lane does and computes the rows where the WRITE
put them (a view of the registered slot), merged by layer across links as the fast lane merges; on a CPU
rank on the poll thread itself, on a GPU rank on the compute thread (through the rank's ``FastLane``).
The results are WRITTEN back over the rows of the attention rank's slot, with the completion as the
notification: on a CPU rank straight from the tensor the computation made (registered for the WRITE,
not copied into this end's slot first).

Set-up: ``connect`` answers a link announcement (``NixlLink``, on an ``Exchange`` stream) with this
rank's end (an agent and K slots of the announced fast-link geometry, in host memory on a CPU rank, GPU
memory on a GPU rank). An announcement it cannot use (bad geometry, metadata or name) is refused with
``InvalidArgument`` for that stream; the rank goes on. A malformed descriptor or slot header, or rows this
rank cannot compute, is answered with an ``InvalidArgument`` completion for that dispatch only. The link
is detached when its stream ends; its memory is released once the compute thread no longer holds work of it.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import numpy as np
import torch

from asap.dataplane.fastlink import (
    SLOT_HEADER_BYTES,
    Completion,
    LinkGeometry,
    Request,
    SlotHeader,
    write_error,
)
from asap.dataplane.nixl_dispatch import completion_notification
from asap.dataplane.nixl_link import BEAT_NS, NixlEnd, NixlPoller, nixl_missing
from asap.errors import AsapError, InvalidArgument, Unavailable
from asap.v1 import expert_pb2
from expert_svc.fastlane import FastLane, LaneItem
from expert_svc.lane_end import LaneEnd, ServedEnds

__all__ = ["NixlExpertEnd", "NixlLane"]

logger = logging.getLogger(__name__)

MAX_SLOT_BYTES = 256 * 1024 * 1024
"""The largest slot an attention rank may ask this rank to register (x slots per link)."""
_REQUEST_BYTES = 1 + struct.calcsize("<QIIIIQQQI")


class NixlExpertEnd(LaneEnd):
    """One connected NIXL link, expert side (a ``LaneEnd`` of the rank's fast lane)."""

    kind = "NIXL"

    def __init__(self, lane: NixlLane, end: NixlEnd) -> None:
        super().__init__()
        self.lane = lane
        self.end = end
        self.geometry = end.geometry

    def poll(self, now_ns: int) -> bool:
        error = self.end.reap()
        if error:
            logger.warning("NIXL link of %s: %s", self.end.peer, error)
        got = self.end.notifications()
        for raw in got:
            self._take(raw)
        return bool(got)

    @property
    def writing(self) -> bool:
        """Whether this end's answers are still being written (the poll thread moves them on)."""
        return self.end.writing

    def _take(self, raw: bytes) -> None:
        if len(raw) != _REQUEST_BYTES or raw[:1] != b"R":
            logger.warning("NIXL link of %s: a notification that is not a request ignored", self.end.peer)
            return
        request = Request.unpack(raw[1:])
        item = self._admit(request, lambda: self._item(request))
        if item is not None:
            self.lane.take(item)

    def _host(self, slot: int, start: int, end: int) -> memoryview:
        """Bytes ``start..end`` of ``slot`` on the host (a view on CPU ranks, a copy on GPU ranks)."""
        if self.end.buf is not None:
            at = slot * self.geometry.slot_bytes
            return self.end.buf[at + start : at + end]
        return memoryview(self.end.slot(slot)[start:end].cpu().numpy())  # type: ignore[arg-type]

    def _item(self, request: Request) -> LaneItem:
        g = self.geometry
        request.check(g)
        if request.shape_only:
            raise InvalidArgument("a dispatch without row values on the NIXL data plane")
        header = SlotHeader.read(self._host(request.slot, 0, SLOT_HEADER_BYTES), 0, request)
        rows, top_k = request.rows, g.top_k
        hidden_at, ids_at, weights_at, end = g.payload(rows, shape_only=False)
        slot = self.end.slot(request.slot)
        n = rows * g.hidden_size * self.lane.fast.dtype.itemsize
        hidden = slot[hidden_at : hidden_at + n].view(self.lane.fast.dtype).view(rows, g.hidden_size)
        routing = self._host(request.slot, ids_at, end)
        ids = np.frombuffer(routing, dtype=np.int32, count=rows * top_k)
        weights = np.frombuffer(routing, dtype=np.float32, count=rows * top_k, offset=weights_at - ids_at)
        self.lane.fast.validate(request.layer, ids)
        device = hidden.device
        return LaneItem(
            self,
            request,
            header,
            request.layer,
            hidden,
            torch.from_numpy(ids).view(rows, top_k).to(device),  # type: ignore[arg-type]
            torch.from_numpy(weights).view(rows, top_k).to(device),  # type: ignore[arg-type]
            time.time_ns(),
            time.monotonic_ns(),
        )

    def result_rows(self, request: Request) -> torch.Tensor | None:
        """On a CPU rank: a view of this end's registered buffer of the request's slot, so the results
        are computed into warm, registered memory and WRITTEN from it (no fresh tensor to fault in and
        register per layer); ``None`` (a new tensor, registered per WRITE as before) where there is no
        such buffer or it cannot be registered."""
        g = self.geometry
        if self.end.buf is None or request.slot >= g.slots:
            return None
        dtype = self.lane.fast.dtype
        n = request.rows * g.hidden_size * dtype.itemsize
        if n > self.end.buffers.nbytes:
            return None
        try:
            buf = self.end.buffers.get(request.slot)
        except Unavailable as exc:
            logger.warning("NIXL link of %s: no registered answer buffer: %s", self.end.peer, exc.message)
            return None
        return buf[:n].view(dtype).view(request.rows, g.hidden_size)

    def _deliver(
        self, request: Request, out: torch.Tensor | None, error: AsapError | None, completion: Completion
    ) -> None:
        """The results over the rows (or the error text into the slot header), WRITTEN back with the
        completion as the notification."""
        g = self.geometry
        if request.slot >= g.slots:
            return
        slot = self.end.slot(request.slot)
        if error is not None:
            raw = bytearray(SLOT_HEADER_BYTES)
            write_error(memoryview(raw), 0, error.message)
            slot[:SLOT_HEADER_BYTES].copy_(torch.frombuffer(raw, dtype=torch.uint8))
            start, end = 0, SLOT_HEADER_BYTES
        else:
            start = g.payload(request.rows, shape_only=False)[0]
            end = start + request.rows * g.hidden_size * self.lane.fast.dtype.itemsize
            if out is not None and request.rows and self.end.buf is not None:
                self._write_from(request, out, start, completion)  # host rows: from where they are
                return
            if out is not None and request.rows:
                view = slot[start:end].view(self.lane.fast.dtype).view(request.rows, g.hidden_size)
                view.copy_(out)
                if view.device.type == "cuda":
                    torch.cuda.current_stream(view.device).synchronize()  # results before the WRITE
        try:
            self.end.write(request.slot, start, max(end, start + 1), completion_notification(completion))
        except Unavailable as exc:
            self._lost(request, exc)

    def _write_from(self, request: Request, out: torch.Tensor, start: int, completion: Completion) -> None:
        """One WRITE of the results from the memory the computation made them in (registered for it)
        over the rows of the attention rank's slot: no copy into this end's slot."""
        source = out.detach().to(dtype=self.lane.fast.dtype).contiguous()  # [rows, H]
        try:
            # computed into this end's buffer (``result_rows``): registered already, kept registered
            registered = None if self.end.buffers.owns(source) else self.end.register(source)
            piece = (int(source.data_ptr()), source.numel() * source.element_size(), start)
            self.end.post(
                request.slot, [piece], completion_notification(completion), registered=registered, hold=source
            )
        except Unavailable as exc:
            self._lost(request, exc)

    def _lost(self, request: Request, exc: Unavailable) -> None:
        logger.warning("NIXL link of %s: answer of seq=%d lost: %s", self.end.peer, request.seq, exc.message)

    def detach(self) -> None:
        with self._lock:
            if self._detached:
                return
            self._detached = True
            close = self._held <= 0
        if close:
            self._close()

    def _close(self) -> None:
        if self._shut():
            self.end.close()


class NixlLane(ServedEnds[NixlExpertEnd]):
    """All NIXL links of one expert rank: their poll thread, which on a CPU rank also computes what it
    took (merged by layer as the fast lane merges; no hand-off to the compute thread, whose wake costs
    100-300 µs on a loaded host), and a thread sending every end's heartbeat (a long computation on the
    poll thread must not look like a frozen rank). A GPU rank hands its rows to the compute thread (its
    streams and graphs live there) through the rank's ``fast`` lane."""

    def __init__(self, fast: FastLane, device: torch.device) -> None:
        self.fast = fast
        self.device = device
        self.inline = device.type == "cpu"
        self._taken: list[LaneItem] = []
        self.poller = NixlPoller("nixl-requests", flush=self._flush)
        self.ends: set[NixlExpertEnd] = set()
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="nixl-beats", daemon=True)
        """Started with the first link (most ranks never get one)."""
        self._start_lock = threading.Lock()

    def take(self, item: LaneItem) -> None:
        """A dispatch taken by the poll thread (computed at the end of its sweep)."""
        if self.inline:
            self._taken.append(item)
        else:
            self.fast.enqueue(item)

    def _flush(self) -> None:
        """After a sweep (poll thread): compute what it took, here on a CPU rank, else on the compute
        thread."""
        if not self.inline:
            self.fast.hand_off()
            return
        items, self._taken = self._taken, []
        for group in self.fast._groups(items):  # the fast lane's merging and answering, on this thread
            self.fast._compute(group)

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_NS / 1e9):
            for end in list(self.ends):
                end.end.beat()

    def close(self) -> None:
        self._stop.set()
        super().close()

    def connect(self, link: expert_pb2.NixlLink) -> tuple[NixlExpertEnd, expert_pb2.NixlLink]:
        """This rank's end of an announced link and its answer; ``InvalidArgument`` if unusable,
        ``Unavailable`` if NIXL does not work here."""
        missing = nixl_missing()
        if missing:
            raise Unavailable(missing)
        if link.slot_bytes > MAX_SLOT_BYTES:
            raise InvalidArgument(f"NIXL link slots of {link.slot_bytes} bytes (at most {MAX_SLOT_BYTES})")
        geometry = LinkGeometry(link.slots, link.slot_bytes, link.hidden_size, link.top_k, link.itemsize)
        self.fast.check_geometry(geometry)
        local = NixlEnd("e", geometry, self.device)
        try:
            local.connect(link)
        except BaseException:
            local.close()
            raise
        end = self._serve(NixlExpertEnd(self, local))
        with self._start_lock:
            if self._beats.ident is None and not self._stop.is_set():
                self._beats.start()
        return end, local.announcement()
