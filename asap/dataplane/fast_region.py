"""The attention side's shared-memory region of one fast link: the mapping in the fast link's layout
(``asap.dataplane.fastlink``), its request and completion rings, its two doorbells and their names, the
heartbeat words, and the slots' payload as the sender writes it and the results as they are read back.

The dispatches, credits and failure handling that use the region are the link end's
(``asap.dataplane.fast_attention``). The names are unlinked as soon as the expert rank attached, so a
killed process leaves nothing behind; the mapping itself goes only when the end is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading

import torch

from asap.dataplane.fastlink import (
    HEARTBEAT_ATTENTION,
    HEARTBEAT_EXPERT,
    LinkGeometry,
    SlotHeader,
    beat,
    error_of,
    heartbeat,
    read_error,
)
from asap.dataplane.ring import WAIT_BELL, WAIT_FUTEX, Doorbell, Ring
from asap.dataplane.shm import ShmRegion, region_name
from asap.errors import AsapError
from asap.v1 import expert_pb2

__all__ = ["AttentionRegion", "SharedWaitRing"]

logger = logging.getLogger(__name__)


class SharedWaitRing(Ring):
    """The completion ring, whose consumer may be two threads (the poll thread and a waiting compute
    thread): its ``waiting`` word holds the bit of every way one of them sleeps (``WAIT_BELL``,
    ``WAIT_FUTEX``), counted per way, so one of them clearing its flag cannot hide a completion from the
    other. Both park on the word itself where shared futexes work (``futex_wait``)."""

    def __init__(self, buf: memoryview, offset: int, capacity: int) -> None:
        super().__init__(buf, offset, capacity, futex_wait=True)
        self._parked = {WAIT_BELL: 0, WAIT_FUTEX: 0}
        self._parked_lock = threading.Lock()

    def set_waiting(self, waiting: bool, how: int = WAIT_BELL) -> int:
        with self._parked_lock:
            parked = self._parked
            parked[how] = parked[how] + 1 if waiting else max(0, parked[how] - 1)
            state = (WAIT_BELL if parked[WAIT_BELL] else 0) | (WAIT_FUTEX if parked[WAIT_FUTEX] else 0)
            super().set_waiting(bool(state), state)
            return state


def _bytes_of(t: torch.Tensor, dtype: torch.dtype) -> memoryview:
    """The row-major bytes of ``t`` as ``dtype`` (a view when it already is one, on the CPU)."""
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]


class AttentionRegion:
    """The region of one fast link, attention side (see the module doc); a base of the link end, whose
    ``peer`` names it in log lines."""

    peer: str

    def __init__(
        self, geometry: LinkGeometry, *, attention_rank: int, expert_rank: int, dtype: torch.dtype
    ) -> None:
        self.geometry = geometry
        self.dtype = dtype
        name = region_name(attention_rank, expert_rank)
        self.region = ShmRegion.create(name, geometry.nbytes)
        self._buf = self.region._buf()
        geometry.write(self._buf)
        base = os.path.join(tempfile.gettempdir(), name)
        self.request_bell = Doorbell.create(base + ".req")
        self.completion_bell = Doorbell.create(base + ".cmp")
        self.requests = Ring(self._buf, geometry.requests_at, geometry.slots)
        self.completions = SharedWaitRing(self._buf, geometry.completions_at, geometry.slots)
        self.inbound, self.bell = self.completions, self.completion_bell  # what the poll thread parks on
        self._zero_beat_logged = False

    def announcement(self) -> expert_pb2.DispatchChunk:
        """What goes out on the link's stream for the expert rank to attach the region."""
        return expert_pb2.DispatchChunk(
            fast_link=expert_pb2.FastLink(
                region=self.region.name,
                request_bell=self.request_bell.path,
                completion_bell=self.completion_bell.path,
            )
        )

    def _unlink_names(self) -> None:
        """The expert attached: the names may go, so nothing is left behind if a process is killed."""
        self.region.unlink()
        self.request_bell.unlink()
        self.completion_bell.unlink()

    def _beat(self, now_ns: int, *, attached: bool) -> int:
        """Write this side's heartbeat word; the expert's (0: it has not attached yet)."""
        beat(self._buf, HEARTBEAT_ATTENTION, now_ns)
        expert_beat = heartbeat(self._buf, HEARTBEAT_EXPERT)
        if attached and not expert_beat and not self._zero_beat_logged:
            # Should never happen: nothing zeroes the word once the expert wrote it. It did while
            # heartbeats were written with ``struct.pack_into`` (zeroed, then filled byte by byte: a
            # load in between read 0, and an end older than ``attach_s`` failed as "never attached",
            # benchmarks/README.md, Soak); words are now stored whole (``asap.dataplane.words``).
            self._zero_beat_logged = True
            logger.warning("%s: the expert's heartbeat word reads 0 after it attached", self.peer)
        return expert_beat

    def fill(
        self,
        slot: int,
        header: SlotHeader,
        hidden: torch.Tensor | None,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Write one dispatch into ``slot`` (any thread): header, rows (None: shapes only), ids, weights."""
        g = self.geometry
        at = g.slot_at(slot)
        rows = header.rows
        hidden_at, ids_at, weights_at, _ = g.payload(rows, shape_only=hidden is None)
        header.write(self._buf, at)
        if rows == 0:
            return
        top_k = g.top_k
        if hidden is not None:
            nbytes = rows * g.hidden_size * self.dtype.itemsize
            dst = torch.frombuffer(self._buf, dtype=torch.uint8, count=nbytes, offset=at + hidden_at)
            dst.view(self.dtype).view(rows, g.hidden_size).copy_(hidden)
        # plain byte copies (a few µs) rather than torch copies into frombuffer views (tens of µs each)
        n = rows * top_k * 4
        self._buf[at + ids_at : at + ids_at + n] = _bytes_of(expert_ids, torch.int32)
        self._buf[at + weights_at : at + weights_at + n] = _bytes_of(weights, torch.float32)

    def _error_in(self, slot: int, status: int) -> AsapError:
        """The error the expert wrote into ``slot`` with a failed completion of ``status``."""
        return error_of(status, read_error(self._buf, self.geometry.slot_at(slot)))

    def _results_in(self, slot: int, rows: int) -> torch.Tensor:
        """The results written over ``slot``'s rows, copied out before the slot is reused."""
        g = self.geometry
        hidden_at = g.slot_at(slot) + g.payload(rows, shape_only=False)[0]
        nbytes = rows * g.hidden_size * self.dtype.itemsize
        raw = torch.frombuffer(self._buf, dtype=torch.uint8, count=nbytes, offset=hidden_at)
        return raw.view(self.dtype).view(rows, g.hidden_size).clone()

    def _unmap(self) -> None:
        """Drop the rings, the mapping and the doorbells (the caller keeps other threads off them)."""
        self.requests.release()
        self.completions.release()
        self._buf = memoryview(b"")
        with contextlib.suppress(BufferError):  # a result view still alive: the mapping goes with it
            self.region.close()
        self.request_bell.close()
        self.completion_bell.close()
