"""The expert rank's end of its fast links: one poll thread takes descriptors from every attached link
and feeds the compute thread directly; the compute thread writes results over the rows and publishes
completions itself. No event loop, no protobuf, no thread hop beyond poll thread -> compute thread.

Validation on the poll thread uses numpy views of the slot (a few µs), not torch ops (tens of µs each).

Emulated ranks (shape-only slots, ``inline``) compute on the poll thread itself: their computation is a
timed sleep of about a millisecond, so the hand-off to the compute thread (a thread wake, 70-200 µs per
layer on this 2-core host, more under load) cost more than it spared. Measured on the emulated cluster
(benchmarks/README.md, "CPU per-layer cost: expert hand-off and emulated-call fixes"). An earlier
measurement that rejected it (the emulated call 1.5-2x longer on the poll thread) predates the
emulated call's own fixes (``asap.emulation.clock.Sleeper.begin``, one validation pass); it did not
recur. While it computes the poll thread neither sweeps nor beats the heartbeat: emulated calls take
milliseconds (even dilated, far below the peer timeout of seconds). Real computations (seconds on a CPU)
keep the hand-off, so the heartbeat goes on.

Whoever computes takes *everything* waiting and merges the rows of one layer into one expert call (as
``ExpertExecutor``'s queued path does), so concurrent attention ranks still share a computation; it holds
the executor's compute lock, so the gRPC path's computations (sync mode, the barrier) never overlap it. A malformed descriptor or slot header, or rows this rank cannot compute, is answered with
an ``InvalidArgument`` completion for that dispatch only; the link and the rank go on.

Lifecycle: ``attach`` (the announcement on an ``Exchange`` stream) maps the region and starts the
heartbeat; the link is detached when that stream ends or the attention rank closes the region (a new
region replaces it). Its mapping is closed once the compute thread no longer holds work of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from asap.dataplane.fastlink import (
    HEARTBEAT_EXPERT,
    Completion,
    LinkGeometry,
    Request,
    SlotHeader,
    beat,
    write_error,
)
from asap.dataplane.poller import HeldUntil, PollThread, doorbell_backoff, drain
from asap.dataplane.ring import Doorbell, Ring
from asap.dataplane.shm import ShmRegion
from asap.errors import AsapError, InternalError, InvalidArgument
from asap.telemetry import setup, spans
from asap.v1 import common_pb2, expert_pb2
from expert_svc.core import ExpertExecutor
from expert_svc.lane_end import LaneEnd, ServedEnds

__all__ = ["ExpertLinkEnd", "FastLane", "LaneEnd", "LaneItem"]

logger = logging.getLogger(__name__)

_BELL = re.compile(r"^asap_[A-Za-z0-9_]{1,200}\.(req|cmp)$")


def _bell(path: str) -> Doorbell:
    """Open a doorbell the attention rank named, once it is known to be one of ours (a FIFO in the temp
    directory with an ``asap_`` name), never an arbitrary file."""
    if os.path.dirname(path) != tempfile.gettempdir() or not _BELL.match(os.path.basename(path)):
        raise InvalidArgument(f"fast link doorbell {path!r} is not an asap doorbell")
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise InvalidArgument(f"fast link doorbell {path!r} is not a FIFO")
        return Doorbell(path)
    except OSError as exc:
        raise InvalidArgument(f"cannot open fast link doorbell {path!r}: {exc}") from None


@dataclass(slots=True, eq=False)
class _Item:
    end: LaneEnd
    request: Request
    header: SlotHeader
    layer: int
    hidden: torch.Tensor  # [n, H] a view of the slot's rows (meta with emulated compute)
    expert_ids: torch.Tensor  # [n, K] int32
    weights: torch.Tensor  # [n, K] float32
    picked_unix_ns: int
    picked_ns: int


class ExpertLinkEnd(LaneEnd):
    """One attached fast link region, expert side (an ``Endpoint`` of the lane's poll thread)."""

    def __init__(self, lane: FastLane, link: expert_pb2.FastLink) -> None:
        super().__init__()
        self.lane = lane
        self.region = ShmRegion.attach(link.region)
        try:
            self._buf = self.region._buf()
            self.geometry = LinkGeometry.read(self._buf)
            lane.check_geometry(self.geometry)
            self.request_bell = _bell(link.request_bell)
            self.completion_bell = _bell(link.completion_bell)
        except BaseException:
            self.region.close()
            raise
        g = self.geometry
        self.requests = Ring(self._buf, g.requests_at, g.slots)
        self.completions = Ring(self._buf, g.completions_at, g.slots)
        self.inbound, self.bell = self.requests, self.request_bell  # what the poll thread parks on
        self._delayed: HeldUntil[_Item] = HeldUntil(lambda item: item.request.not_before_ns)
        beat(self._buf, HEARTBEAT_EXPERT, time.monotonic_ns())  # tells the attention rank it attached

    def poll(self, now_ns: int) -> bool:
        worked = drain(self.requests, lambda raw: self._take(Request.unpack(raw), now_ns))
        if self._delayed:
            for item in self._delayed.release(now_ns):
                self.lane.enqueue(item)
            worked = True  # keep polling closely until the modelled arrival
        return worked

    def _take(self, request: Request, now_ns: int) -> None:
        item = self._admit(request, lambda: self._item(request, now_ns))
        if item is None:
            return
        if request.not_before_ns > now_ns:
            self._delayed.hold(item)
        else:
            self.lane.enqueue(item)

    def _item(self, request: Request, now_ns: int) -> _Item:
        g = self.geometry
        request.check(g)
        at = g.slot_at(request.slot)
        header = SlotHeader.read(self._buf, at, request)
        rows, top_k = request.rows, g.top_k
        hidden_at, ids_at, weights_at, _ = g.payload(rows, shape_only=request.shape_only)
        dtype = self.lane.dtype
        if request.shape_only:
            if not self.lane.shape_only:
                raise InvalidArgument("a dispatch without row values to a rank that computes them")
            hidden = torch.empty(rows, g.hidden_size, dtype=dtype, device="meta")
        elif self.lane.shape_only:
            raise InvalidArgument("row values sent to an emulated expert rank")
        else:
            count = rows * g.hidden_size
            hidden = torch.frombuffer(self._buf, dtype=dtype, count=count, offset=at + hidden_at)
            hidden = hidden.view(rows, g.hidden_size)
        ids = np.frombuffer(self._buf, dtype=np.int32, count=rows * top_k, offset=at + ids_at)
        weights = np.frombuffer(self._buf, dtype=np.float32, count=rows * top_k, offset=at + weights_at)
        self.lane.validate(request.layer, ids)
        return _Item(
            self,
            request,
            header,
            request.layer,
            hidden,
            torch.from_numpy(ids).view(rows, top_k),  # type: ignore[arg-type]
            torch.from_numpy(weights).view(rows, top_k),  # type: ignore[arg-type]
            time.time_ns(),
            now_ns,
        )

    def _deliver(
        self, request: Request, out: torch.Tensor | None, error: AsapError | None, completion: Completion
    ) -> None:
        """The results over the rows (or the error text into the header), then the completion published."""
        g = self.geometry
        valid_slot = request.slot < g.slots
        if error is not None and valid_slot:
            write_error(self._buf, g.slot_at(request.slot), error.message)
        self._write_back(request, out if error is None else None, valid_slot)
        if not self.completions.try_push(completion.pack()):
            logger.error("fast link completion ring full (more dispatches than slots?): seq=%d", request.seq)
            return
        if self.completions.consumer_waiting:
            self.completion_bell.ring()

    def _write_back(self, request: Request, out: torch.Tensor | None, valid_slot: bool) -> None:
        """The results over the rows of the request's slot (under the lock, before the completion)."""
        if out is None or out.device.type == "meta" or not request.rows:
            return
        g = self.geometry
        at = g.slot_at(request.slot) + g.payload(request.rows, shape_only=False)[0]
        count = request.rows * g.hidden_size
        dst = torch.frombuffer(self._buf, dtype=self.lane.dtype, count=count, offset=at)
        dst.view(request.rows, g.hidden_size).copy_(out)

    def tick(self, now_ns: int) -> None:
        if self._closed:
            return
        beat(self._buf, HEARTBEAT_EXPERT, now_ns)
        if self.requests.closed:
            self.lane.detach(self)  # the attention rank retired this region

    def detach(self) -> None:
        with self._lock:
            if self._detached:
                return
            self._detached = True
            held = self._held - len(self._delayed)
            self._held = held
            self._delayed.clear()
        if held <= 0:
            self._close()

    def _close(self) -> None:
        if not self._shut():
            return
        self.requests.release()
        self.completions.release()
        self._buf = memoryview(b"")
        with contextlib.suppress(BufferError):  # a view of its rows still referenced: mapping goes with it
            self.region.close()
        self.request_bell.close()
        self.completion_bell.close()


class FastLane(ServedEnds[ExpertLinkEnd]):
    """All fast links of one expert rank: their poll thread and the hand-off to the compute thread."""

    def __init__(
        self,
        executor: ExpertExecutor,
        *,
        shape_only: bool,
        max_merge_rows: int = 16384,
        inline: bool | None = None,
    ) -> None:
        self.executor = executor
        self.inline = shape_only if inline is None else inline
        """Compute on the thread that took the descriptors (the poll thread) instead of handing them to
        the compute thread: the default for emulated (shape-only) ranks, whose computation is a timed
        sleep (see the module doc)."""
        part = executor.part
        self.hidden_size = part.config.hidden_size
        self.top_k = part.config.top_k
        self.dtype = part.dtype
        self.shape_only = shape_only
        self.max_merge_rows = max_merge_rows
        self._moe_layers = set(part.config.moe_layer_ids)
        self._num_experts = part.config.num_experts
        self._hosts = tuple(part.hosted)
        self._hosted = np.zeros(self._num_experts + 1, dtype=bool)  # index -1: a slot for another rank
        self._hosted[list(part.hosted)] = True
        self._hosted[-1] = True
        self._lock = threading.Lock()
        self._waiting: list[_Item] = []
        self._busy = False
        self.poller = PollThread("fast-requests", flush=self._flush, backoff=doorbell_backoff)
        self.ends: set[ExpertLinkEnd] = set()

    def validate(self, layer: int, ids: np.ndarray) -> None:  # type: ignore[type-arg]
        """``ExpertExecutor.validate`` on a numpy view of the slot's ids (same rules, same messages)."""
        if layer not in self._moe_layers:
            raise InvalidArgument(f"layer {layer} is not an MoE layer of this model")
        if ids.size:
            low, high = int(ids.min()), int(ids.max())
            if low < -1 or high >= self._num_experts:
                raise InvalidArgument(f"expert ids must be in [-1, {self._num_experts}), got [{low}, {high}]")
            if not bool(self._hosted[ids].all()):
                bad = sorted({int(i) for i in ids.tolist() if i >= 0 and not self._hosted[i]})
                raise InvalidArgument(
                    f"experts {bad} are not hosted by this rank (hosts {list(self._hosts)})"
                )

    device_slots = False
    """Whether this rank serves links whose slots lie in GPU memory (``expert_svc.gpu_fastlane``)."""

    def check_geometry(self, g: LinkGeometry) -> None:
        if g.device_slots != self.device_slots:
            where = "GPU" if g.device_slots else "host"
            raise InvalidArgument(
                f"a fast link with slots in {where} memory announced to a rank that "
                f"serves {'GPU' if self.device_slots else 'host'} slots"
            )
        if (g.hidden_size, g.top_k, g.itemsize) != (self.hidden_size, self.top_k, self.dtype.itemsize):
            raise InvalidArgument(
                f"fast link of hidden {g.hidden_size}, top-k {g.top_k}, {g.itemsize}-byte elements for a "
                f"rank of hidden {self.hidden_size}, top-k {self.top_k}, {self.dtype}"
            )

    def attach(
        self, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion | None = None
    ) -> ExpertLinkEnd:
        """Map an announced region and start serving it; ``InvalidArgument`` if it is not a valid one
        (``cuda_region``: the slots' GPU memory of a GPU link, which a CPU rank refuses)."""
        return self._serve(self._end(link, cuda_region))

    def _end(self, link: expert_pb2.FastLink, cuda_region: common_pb2.CudaRegion | None) -> ExpertLinkEnd:
        if cuda_region is not None:
            raise InvalidArgument("a fast link with slots in GPU memory announced to a CPU rank")
        return ExpertLinkEnd(self, link)

    @property
    def waiting(self) -> int:
        """Dispatches taken off the rings, waiting for the compute thread (read without the lock: a
        list's length is one atomic read)."""
        return len(self._waiting)

    def enqueue(self, item: _Item) -> None:
        with self._lock:
            self._waiting.append(item)

    def hand_off(self) -> None:
        """Wake the compute thread for what was enqueued (the flush of a poll thread other than the
        lane's own, e.g. the NIXL lane's)."""
        self._flush()

    def _flush(self) -> None:
        """After a sweep (poll thread): compute what was taken here (``inline``), or wake the compute
        thread unless it is already draining."""
        with self._lock:
            if self._busy or not self._waiting:
                return
            self._busy = True
        try:
            if self.inline:
                self.executor.run_inline(self._drain)
            else:
                self.executor.run_on_compute_thread(self._drain)
        except AsapError as exc:
            with self._lock:
                items, self._waiting, self._busy = self._waiting, [], False
            for item in items:
                item.end.answer(item.request, None, error=exc)
                item.end.release()

    def _drain(self) -> None:
        """On the compute thread: compute everything waiting, merged by layer, until nothing is."""
        while True:
            with self._lock:
                items, self._waiting = self._waiting, []
                if not items:
                    self._busy = False
                    return
            for group in self._groups(items):
                self._compute(group)

    def _groups(self, items: list[_Item]) -> list[list[_Item]]:
        groups: dict[int, list[list[_Item]]] = {}
        order: list[list[_Item]] = []
        for item in items:
            bucket = groups.setdefault(item.layer, [])
            rows = item.request.rows
            if bucket and sum(i.request.rows for i in bucket[-1]) + rows <= self.max_merge_rows:
                bucket[-1].append(item)
                continue
            bucket.append([item])
            order.append(bucket[-1])
        return order

    def _run_group(self, group: list[_Item]) -> tuple[list[torch.Tensor], int]:
        """The computation of one group: its outputs per item and the host time it took (a lone item
        into the memory its end sends results from, where the end has such: ``LaneEnd.result_rows``)."""
        out = group[0].end.result_rows(group[0].request) if len(group) == 1 else None
        return self.executor.compute_rows(group, out)

    def _compute(self, group: list[_Item]) -> None:
        started = time.monotonic_ns()
        started_unix = time.time_ns()
        try:
            outs, compute_ns = self._run_group(group)
        except Exception as exc:  # a failed computation fails its dispatches, never the rank
            logger.exception("expert computation failed for layer %d", group[0].layer)
            error = (
                exc if isinstance(exc, InvalidArgument) else InternalError(f"expert compute failed: {exc}")
            )
            for item in group:
                item.end.answer(item.request, None, error=error)
                item.end.release()
            return
        sent = []
        for item, out in zip(group, outs, strict=True):
            item.end.answer(
                item.request,
                out,
                queue_ns=started - item.picked_ns,
                compute_ns=compute_ns,
                picked_unix_ns=item.picked_unix_ns,
            )
            sent.append(time.time_ns())
        if setup.TRACING_ENABLED:  # spans after the completions are out, from the times taken above
            for item, sent_ns in zip(group, sent, strict=True):
                _record_spans(item, started_unix, compute_ns, sent_ns)
        for item in group:
            item.hidden = item.expert_ids = item.weights = torch.empty(0)  # drop the views of the slot
            item.end.release()


LaneItem = _Item
"""One dispatch taken from a link end, for the lane's compute thread (what other link ends build)."""


def _record_spans(item: _Item, started_unix: int, compute_ns: int, sent_ns: int) -> None:
    parent = spans.extract(item.header.traceparent, item.header.tracestate)
    if parent is None:
        return
    r = item.request
    base = {spans.LAYER: r.layer, spans.MICRO_BATCH: r.micro_batch, spans.TOKENS: r.rows}
    transfer = {
        spans.TRANSFER_NS: item.picked_unix_ns - r.sent_unix_ns,
        spans.ATTENTION_RANK: r.attention_rank,
    }
    spans.record(spans.EXPERT_QUEUE, parent, item.picked_unix_ns, started_unix, {**base, **transfer})
    spans.record(spans.EXPERT_COMPUTE, parent, started_unix, started_unix + compute_ns, base)
    spans.record(spans.EXPERT_COMBINE_SEND, parent, started_unix + compute_ns, sent_ns, base)
