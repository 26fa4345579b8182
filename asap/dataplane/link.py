"""The attention-side regions of one attention -> expert link (shared memory or CUDA IPC) and their slots.

One region per stream: a new stream may reach a new expert process, so it gets a new region and the old
one is retired (its name removed at once, its mapping closed once no dispatch holds slots of it). A
dispatch takes a ``Slots`` of the current region, places its chunks' rows into it, and releases it when
every chunk was answered. A dispatch abandoned while chunks are unanswered (failed or cancelled) leaves
its slots quarantined until the late answers arrive or the stream ends: the expert rank may still write
results there, and a slot reused too early would have another dispatch's rows overwritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from asap.dataplane.cuda_ipc import CudaRegion
from asap.dataplane.refs import checked_ref
from asap.dataplane.shm import ShmRegion, SlotAllocator, region_name
from asap.errors import InvalidArgument
from asap.v1 import common_pb2

__all__ = ["LinkRegions", "Region", "Slots"]

Region = ShmRegion | CudaRegion
_Key = tuple[int, int]  # (micro_batch, layer)


@dataclass(slots=True)
class Slots:
    """Region slots of one dispatch, kept until every chunk sent has been answered."""

    region: Region
    allocator: SlotAllocator
    offsets: list[int] = field(default_factory=list)
    outstanding: int = 0
    """Chunks sent but not yet answered (the expert rank may still write results into their slots)."""

    def placer(self) -> Callable[[torch.Tensor], common_pb2.Tensor | None]:
        """The ``place_hidden`` hook of the dispatch: rows into a free slot (offset recorded), or None
        when they do not fit (they go inline)."""

        def place(rows: torch.Tensor) -> common_pb2.Tensor | None:
            offset = self.allocator.alloc(rows.numel() * rows.element_size())
            if offset is None:
                return None
            self.offsets.append(offset)
            return self.region.tensor(rows, offset)

        return place


class LinkRegions:
    """Regions, slots and quarantine of one link; ``plane`` is ``shm`` or ``cuda-ipc``."""

    def __init__(
        self, plane: str, *, size: int, attention_rank: int, expert_rank: int, device: torch.device
    ) -> None:
        if plane not in ("shm", "cuda-ipc"):
            raise InvalidArgument(f"no regions for data plane {plane!r}")
        self.plane = plane
        self.size = size
        self.attention_rank = attention_rank
        self.expert_rank = expert_rank
        self.device = device
        self.current: Region | None = None
        self._allocator: SlotAllocator | None = None
        self._by_name: dict[str, Region] = {}
        """Regions of this link by name (current and retired), to resolve result references."""
        self._retired: set[Region] = set()
        self._users: dict[Region, int] = {}
        """Dispatches still holding slots of each region."""
        self._quarantine: dict[_Key, Slots] = {}
        self.quarantined = 0
        """Dispatches abandoned with chunks still unanswered (their slots were quarantined)."""
        self.result_ref_bytes = 0
        """Result bytes the expert rank wrote back into these regions."""

    def _new_region(self) -> Region:
        if self.plane == "cuda-ipc":
            label = f"a{self.attention_rank}_e{self.expert_rank}_"
            return CudaRegion.create(self.device, self.size, label=label)
        return ShmRegion.create(region_name(self.attention_rank, self.expert_rank), self.size)

    def take(self) -> Slots:
        """Slots of the current region (created on first use) for one dispatch."""
        if self.current is None or self._allocator is None:
            self.current = self._new_region()
            self._allocator = SlotAllocator(self.size)
            self._by_name[self.current.name] = self.current
        self._users[self.current] = self._users.get(self.current, 0) + 1
        return Slots(self.current, self._allocator)

    def release(self, slots: Slots) -> None:
        for offset in slots.offsets:
            slots.allocator.free(offset)
        slots.offsets.clear()
        self._users[slots.region] -= 1
        self._close_retired()

    def finish(self, key: _Key, slots: Slots, *, outstanding: int, stream_alive: bool) -> None:
        """A dispatch is over: release its slots, or quarantine them while ``outstanding`` chunks of a live
        stream are unanswered."""
        slots.outstanding = outstanding
        if outstanding > 0 and slots.offsets and stream_alive:
            self._quarantine[key] = slots
            self.quarantined += 1
        else:
            self.release(slots)

    def late_answer(self, key: _Key) -> None:
        """An answer to an abandoned dispatch arrived: free its slots once all its answers did."""
        slots = self._quarantine.get(key)
        if slots is not None:
            slots.outstanding -= 1
            if slots.outstanding <= 0:
                del self._quarantine[key]
                self.release(slots)

    def stream_ended(self) -> None:
        """Nothing more will be written into quarantined slots: free them."""
        quarantined, self._quarantine = self._quarantine, {}
        for slots in quarantined.values():
            self.release(slots)

    def new_stream(self) -> None:
        """Retire the current region: its name goes now, its mapping once no dispatch holds slots of it."""
        if self.current is not None:
            self.current.unlink()
            self._retired.add(self.current)
            self.current, self._allocator = None, None
            self._close_retired()

    def _close_retired(self) -> None:
        for region in list(self._retired):
            if not self._users.get(region):
                region.close()
                self._retired.discard(region)
                self._users.pop(region, None)
                self._by_name.pop(region.name, None)

    @property
    def in_quarantine(self) -> int:
        return len(self._quarantine)

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the current region held by dispatches (quarantined ones included)."""
        return self._allocator.in_use if self._allocator is not None else 0

    def resolve(self, msg: common_pb2.Tensor, dims: list[int], what: str) -> torch.Tensor:
        """A view of results the expert rank wrote into one of these regions (the ``refs`` of the
        combine assembler)."""
        field = "cuda_ipc" if msg.HasField("cuda_ipc") else "shm"
        name = getattr(msg, field).region
        region = self._by_name.get(name)
        if region is None:
            raise InvalidArgument(f"{what}: results in region {name!r}, which is not this link's")
        ref, dtype = checked_ref(msg, field, region.size, dims, what)
        self.result_ref_bytes += ref.nbytes
        return region.view(ref.offset, dtype, dims)

    def close(self) -> None:
        if self.current is not None:
            self.current.destroy()
            self.current = None
        for region in self._retired:
            region.destroy()
        self._retired.clear()
        self._users.clear()
        self._by_name.clear()
        self._quarantine.clear()
