"""One attached CPU fast link of an expert rank: the attention rank's shared-memory region mapped here,
its request ring (parked on by the lane's poll thread), its completion ring, and the descriptor checks
that turn a request into a ``LaneItem`` for the lane (``expert_svc.fastlane``).

A malformed descriptor or slot header, or rows this rank cannot compute, is answered with an
``InvalidArgument`` completion for that dispatch only (``LaneEnd._admit``); the link goes on. Lifecycle:
``FastLane.attach`` maps the region and starts the heartbeat; the end is detached when its stream ends or
the attention rank closes the region, and its mapping is closed once the compute thread no longer holds
work of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
import time
from typing import TYPE_CHECKING

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
from asap.dataplane.poller import HeldUntil, drain
from asap.dataplane.ring import Doorbell, Ring
from asap.dataplane.shm import ShmRegion
from asap.errors import AsapError, InvalidArgument
from asap.v1 import expert_pb2
from expert_svc.lane_end import LaneEnd
from expert_svc.lane_item import LaneItem

if TYPE_CHECKING:
    from expert_svc.fastlane import FastLane

__all__ = ["ExpertLinkEnd"]

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
        self.requests = Ring(self._buf, g.requests_at, g.slots, futex_wait=True)  # parks on its word
        self.completions = Ring(self._buf, g.completions_at, g.slots)
        self.inbound, self.bell = self.requests, self.request_bell  # what the poll thread parks on
        self._delayed: HeldUntil[LaneItem] = HeldUntil(lambda item: item.request.not_before_ns)
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

    def _item(self, request: Request, now_ns: int) -> LaneItem:
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
            hidden = self.lane.meta_rows(rows)
        elif self.lane.shape_only:
            raise InvalidArgument("row values sent to an emulated expert rank")
        else:
            count = rows * g.hidden_size
            hidden = torch.frombuffer(self._buf, dtype=dtype, count=count, offset=at + hidden_at)
            hidden = hidden.view(rows, g.hidden_size)
        shape = (rows, top_k)  # numpy views shaped first: one torch call each, not two
        ids = np.frombuffer(self._buf, dtype=np.int32, count=rows * top_k, offset=at + ids_at).reshape(shape)
        weights = np.frombuffer(self._buf, dtype=np.float32, count=rows * top_k, offset=at + weights_at)
        self.lane.validate(request.layer, ids)
        return LaneItem(
            self,
            request,
            header,
            request.layer,
            hidden,
            torch.from_numpy(ids),
            torch.from_numpy(weights.reshape(shape)),
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
        self.completions.wake(self.completion_bell)

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
