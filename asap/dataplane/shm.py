"""POSIX shared-memory data plane for CPU ranks on the same host.

An attention rank creates one ``ShmRegion`` per expert link (and stream) and writes the ``hidden`` rows of
every dispatch chunk into a slot of it; the chunk then carries only an ``asap.v1.RegionRef`` (region,
offset, nbytes) instead of inline bytes. The expert rank attaches the region by name on the first
reference and copies the rows out once (``ShmAttachments.decode``), so its compute never depends on the
slot. It writes the chunk's results back over the same rows (``write_back``) and answers with a reference
to them; the attention rank copies them out of its region before the slot is reused.

Slots come from a first-fit ``SlotAllocator`` over the region. A slot is freed when the chunk's combine
answer has been read. A dispatch that fails or is cancelled keeps its slots until the expert rank has
answered each of its chunks (or the stream ends), because the expert rank may still write results there.
A payload that does not fit in the free space travels as inline bytes (the gRPC fallback), and so do its
results.

Lifecycle: the creator ``unlink``s (removes the name) and ``close``s (unmaps) its regions; attachers only
``close``. Both are idempotent. Attachers do not register the region with Python's resource tracker,
which would otherwise unlink the creator's region when the attaching process exits.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import secrets
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import torch

from asap.dataplane.refs import checked_ref, ref_tensor
from asap.errors import InvalidArgument
from asap.v1 import common_pb2

__all__ = [
    "ALIGN",
    "DEFAULT_REGION_BYTES",
    "ShmAttachments",
    "ShmRegion",
    "SlotAllocator",
    "region_name",
]

DEFAULT_REGION_BYTES = 64 * 1024 * 1024
"""Size of the region of one attention -> expert link."""

ALIGN = 64
"""Slot alignment in bytes (a cache line; any supported dtype's itemsize divides it)."""

_NAME = re.compile(r"^asap_[A-Za-z0-9_]{1,200}$")
_CREATED: set[str] = set()  # regions created by this process (the resource tracker knows them already)
_CREATED_LOCK = threading.Lock()


def region_name(attention_rank: int, expert_rank: int) -> str:
    """A fresh, unguessable region name for one attention -> expert link."""
    return f"asap_{os.getpid()}_a{attention_rank}_e{expert_rank}_{secrets.token_hex(6)}"


class ShmRegion:
    """A named POSIX shared-memory region; ``create`` it on one side and ``attach`` to it on the other."""

    def __init__(self, shm: SharedMemory, *, owner: bool) -> None:
        self._shm: SharedMemory | None = shm
        self.name = shm.name
        self.size = shm.size
        self.owner = owner
        self._unlinked = False

    @classmethod
    def create(cls, name: str, size: int) -> ShmRegion:
        if not _NAME.match(name):
            raise InvalidArgument(f"shared-memory region name {name!r} is not asap_[A-Za-z0-9_]+")
        if size <= 0:
            raise InvalidArgument(f"shared-memory region size must be > 0, got {size}")
        shm = SharedMemory(name=name, create=True, size=size)
        with _CREATED_LOCK:
            _CREATED.add(shm.name)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> ShmRegion:
        """Open an existing region; raise ``InvalidArgument`` if the name is bad or no such region exists."""
        if not _NAME.match(name):
            raise InvalidArgument(f"shared-memory region name {name!r} is not asap_[A-Za-z0-9_]+")
        try:
            shm = SharedMemory(name=name, create=False)
        except (FileNotFoundError, PermissionError, OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot attach shared-memory region {name!r}: {exc}") from None
        with _CREATED_LOCK:
            created_here = shm.name in _CREATED
        if not created_here:  # Python < 3.13 registers attachers too; only the creator may unlink
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, owner=False)

    @property
    def closed(self) -> bool:
        return self._shm is None

    def _buf(self) -> memoryview:
        if self._shm is None or self._shm.buf is None:
            raise InvalidArgument(f"shared-memory region {self.name!r} is closed")
        return self._shm.buf

    def _check(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise InvalidArgument(
                f"shared-memory range {offset}..{offset + nbytes} is outside region {self.name!r} "
                f"of {self.size} bytes"
            )

    def write(self, offset: int, t: torch.Tensor) -> int:
        """Copy ``t``'s row-major bytes to ``offset`` (one copy); return the byte count."""
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        nbytes = t.numel() * t.element_size()
        self._check(offset, nbytes)
        if nbytes:
            dst = torch.frombuffer(self._buf(), dtype=torch.uint8, count=nbytes, offset=offset)
            dst.view(t.dtype).view(t.shape).copy_(t)
        return nbytes

    def view(self, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """A zero-copy tensor over the region's bytes at ``offset`` (valid while the region is open)."""
        nbytes = math.prod(shape) * dtype.itemsize
        self._check(offset, nbytes)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize:
            raise InvalidArgument(f"offset {offset} is not aligned to {dtype} ({dtype.itemsize} bytes)")
        raw = torch.frombuffer(self._buf(), dtype=torch.uint8, count=nbytes, offset=offset)
        return raw.view(dtype).view(shape)

    def read(self, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """A private copy of the tensor at ``offset`` (one copy)."""
        return self.view(offset, dtype, shape).clone()

    def tensor(self, t: torch.Tensor, offset: int) -> common_pb2.Tensor:
        """Write ``t`` at ``offset`` and return the ``asap.v1.Tensor`` referencing it."""
        return shm_tensor(t, self, offset)

    def close(self) -> None:
        """Unmap the region (idempotent). Zero-copy views must be gone by then."""
        shm, self._shm = self._shm, None
        if shm is not None:
            shm.close()

    def unlink(self) -> None:
        """Remove the region's name (creator only; idempotent). Mappings stay valid until closed."""
        if not self.owner or self._unlinked:
            return
        self._unlinked = True
        with _CREATED_LOCK:
            _CREATED.discard(self.name)
        with contextlib.suppress(FileNotFoundError):  # SharedMemory.unlink also unregisters the tracker
            if self._shm is not None:
                self._shm.unlink()
            else:
                _unlink_name(self.name)

    def destroy(self) -> None:
        """``unlink`` then ``close``."""
        self.unlink()
        self.close()


def _unlink_name(name: str) -> None:
    shm = SharedMemory(name=name, create=False)
    try:
        shm.unlink()
    finally:
        shm.close()


class SlotAllocator:
    """First-fit allocator of ``ALIGN``-aligned byte ranges of a region; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = []  # sorted starts of allocated ranges
        self._ends: dict[int, int] = {}
        self._lock = threading.Lock()

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free range of ``nbytes`` (rounded up to ``ALIGN``), or None when none is free."""
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        with self._lock:
            cursor = 0
            for i, start in enumerate(self._starts):
                if start - cursor >= need:
                    self._starts.insert(i, cursor)
                    self._ends[cursor] = cursor + need
                    return cursor
                cursor = self._ends[start]
            if self.size - cursor >= need:
                self._starts.append(cursor)
                self._ends[cursor] = cursor + need
                return cursor
            return None

    def free(self, offset: int) -> None:
        with self._lock:
            if self._ends.pop(offset, None) is not None:
                del self._starts[bisect.bisect_left(self._starts, offset)]

    @property
    def in_use(self) -> int:
        with self._lock:
            return sum(end - start for start, end in self._ends.items())


def shm_tensor(t: torch.Tensor, region: ShmRegion, offset: int) -> common_pb2.Tensor:
    """Write ``t`` into ``region`` at ``offset`` and return the ``asap.v1.Tensor`` referencing it."""
    nbytes = region.write(offset, t)
    return ref_tensor("shm", t.dtype, t.shape, region.name, offset, nbytes)


class ShmAttachments:
    """The regions a receiving service has attached, by name; resolves and validates ``RegionRef``s."""

    def __init__(self, max_regions: int = 1024) -> None:
        self._regions: dict[str, ShmRegion] = {}
        self._max = max_regions
        self._lock = threading.Lock()
        self.bytes_read = 0
        """Payload bytes received through shared memory."""

    def region(self, name: str) -> ShmRegion:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                if len(self._regions) >= self._max:
                    raise InvalidArgument(f"too many shared-memory regions attached ({self._max})")
                region = ShmRegion.attach(name)
                self._regions[name] = region
            return region

    def decode(self, msg: common_pb2.Tensor, dims: list[int], what: str) -> torch.Tensor:
        """Validate ``msg.shm`` against ``msg``'s dtype and ``dims`` and return a private copy of it."""
        if not msg.HasField("shm"):
            raise InvalidArgument(f"{what}: a CUDA IPC reference on the shared-memory data plane")
        region = self.region(msg.shm.region)
        ref, dtype = checked_ref(msg, "shm", region.size, dims, what)
        out = region.read(ref.offset, dtype, dims)
        self.bytes_read += ref.nbytes
        return out

    def write_back(
        self, ref_msg: common_pb2.Tensor, result: torch.Tensor, ready: object = None
    ) -> common_pb2.Tensor:
        """Write ``result`` over the rows ``ref_msg`` (a decoded chunk's hidden) references; return the
        ``asap.v1.Tensor`` referencing the results. ``ready`` is unused (CPU work is done on return)."""
        ref = ref_msg.shm
        nbytes = result.numel() * result.element_size()
        if nbytes != ref.nbytes:
            raise InvalidArgument(f"combine result of {nbytes} bytes for a reference of {ref.nbytes} bytes")
        region = self.region(ref.region)
        region.write(ref.offset, result)
        return ref_tensor("shm", result.dtype, result.shape, ref.region, ref.offset, nbytes)

    def close(self) -> None:
        with self._lock:
            regions, self._regions = self._regions, {}
        for region in regions.values():
            region.close()
