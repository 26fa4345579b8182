"""CUDA IPC data plane for GPU ranks on the same host.

An attention rank allocates one region of GPU memory per expert link (on its own GPU) and announces it
once per stream (``DispatchChunk.cuda_region``: the IPC handles PyTorch's CUDA storage sharing uses).
Every dispatch chunk's hidden rows are copied into a slot of the region on the link's copy stream, which
is synchronised before the chunk is sent, so the chunk carries only a ``RegionRef``. The expert rank
maps the region once (``CudaAttachments``), computes straight from the slot (a zero-copy view; on
another GPU the model's ``.to(device)`` copies over NVLink), writes the chunk's results back over the
same rows, synchronises, and answers with a reference to them. The attention rank copies the results out
of its own region before it frees the slot. gRPC carries only metadata and the ready signals (the chunk
and its answer), like the shared buffers with flags of a paper design, with the memory owned by the
attention rank so that allocation and reuse have one owner.

Region memory of a peer is mapped by GPU UUID, not index, so ranks with different
``CUDA_VISIBLE_DEVICES`` still agree on the GPU. Only the PyTorch CUDA build is needed.
"""

from __future__ import annotations

import math
import secrets
import threading
from dataclasses import dataclass

import torch

from asap.dataplane.refs import checked_ref, ref_tensor
from asap.errors import InvalidArgument
from asap.v1 import common_pb2

__all__ = [
    "DEFAULT_CUDA_REGION_BYTES",
    "CudaAttachments",
    "CudaRegion",
    "cuda_ipc_available",
    "gpu_uuid",
    "visible_gpu_uuids",
]

DEFAULT_CUDA_REGION_BYTES = 256 * 1024 * 1024
"""Size of the GPU region of one attention -> expert link (16k rows of hidden 4096 in bf16 fit twice)."""


def cuda_ipc_available() -> bool:
    """Whether this process can share CUDA memory with other processes (a CUDA build with a GPU)."""
    return torch.cuda.is_available() and hasattr(torch.UntypedStorage, "_share_cuda_")


def gpu_uuid(device: torch.device | str) -> str:
    """The UUID of a visible GPU (``GPU-...``), the same in every process whatever its device indices."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs this process sees, by device index; empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    return [gpu_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]


def _view(buf: torch.Tensor, offset: int, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype, device=buf.device)
    return buf[offset : offset + nbytes].view(dtype).view(dims)


class CudaRegion:
    """GPU memory of an attention rank shared with one expert rank; ``create`` it, then ``announce``."""

    def __init__(self, buf: torch.Tensor, name: str) -> None:
        self.buf = buf  # [size] uint8 on the owner's GPU
        self.name = name
        self.size = int(buf.numel())
        self.device = buf.device
        self.announced = False
        """Whether the announcement went out on the current stream (a new stream gets a new region)."""
        self._announcement: common_pb2.CudaRegion | None = None

    @classmethod
    def create(cls, device: torch.device | str, size: int, *, label: str = "") -> CudaRegion:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise InvalidArgument(f"a CUDA IPC region needs a cuda device, got {dev}")
        if size <= 0:
            raise InvalidArgument(f"CUDA IPC region size must be > 0, got {size}")
        buf = torch.empty(size, dtype=torch.uint8, device=dev)
        return cls(buf, f"cuda_{label}{secrets.token_hex(6)}")

    def announcement(self) -> common_pb2.CudaRegion:
        """What a peer needs to map this region (computed once: each share registers a peer reference)."""
        if self._announcement is None:
            storage = self.buf.untyped_storage()
            (
                _device,
                handle,
                storage_bytes,
                storage_offset,
                ref_counter_handle,
                ref_counter_offset,
                event_handle,
                event_sync_required,
            ) = storage._share_cuda_()  # type: ignore[attr-defined,no-untyped-call]
            self._announcement = common_pb2.CudaRegion(
                name=self.name,
                device_uuid=gpu_uuid(self.device),
                handle=handle,
                storage_bytes=storage_bytes,
                storage_offset=storage_offset,
                ref_counter_handle=ref_counter_handle,
                ref_counter_offset=ref_counter_offset,
                event_handle=event_handle or b"",
                event_sync_required=bool(event_sync_required),
            )
        return self._announcement

    def write(self, offset: int, t: torch.Tensor) -> int:
        """Copy ``t`` to ``offset`` on the current stream (asynchronous); return the byte count."""
        nbytes = t.numel() * t.element_size()
        if offset < 0 or offset + nbytes > self.size:
            raise InvalidArgument(f"range {offset}..{offset + nbytes} is outside region of {self.size} bytes")
        if nbytes:
            _view(self.buf, offset, t.dtype, list(t.shape)).copy_(t, non_blocking=True)
        return nbytes

    def view(self, offset: int, dtype: torch.dtype, dims: list[int]) -> torch.Tensor:
        return _view(self.buf, offset, dtype, dims)

    def unlink(self) -> None:
        """Nothing to do: a CUDA region has no name outside the processes that map it."""

    def close(self) -> None:
        """Drop this process's reference; PyTorch frees the memory once no peer maps it any more."""
        self.buf = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.size = 0

    def destroy(self) -> None:
        self.close()

    def tensor(self, t: torch.Tensor, offset: int) -> common_pb2.Tensor:
        """Write ``t`` at ``offset`` and return the ``asap.v1.Tensor`` referencing it."""
        nbytes = self.write(offset, t)
        return ref_tensor("cuda_ipc", t.dtype, t.shape, self.name, offset, nbytes)


@dataclass(slots=True)
class _Mapped:
    buf: torch.Tensor  # [size] uint8, the peer's memory mapped into this process


class CudaAttachments:
    """Regions one stream announced, mapped into this process (expert side); closed with the stream.

    ``decode`` gives a zero-copy view of a chunk's rows; ``write_back`` puts a chunk's results over them on
    ``stream`` and waits for the copy, so the answer can go out as soon as it returns.
    """

    def __init__(self, max_regions: int = 64) -> None:
        self._regions: dict[str, _Mapped] = {}
        self._max = max_regions
        self._lock = threading.Lock()
        self._local = {uuid: i for i, uuid in enumerate(visible_gpu_uuids())}
        self.bytes_read = 0
        self.bytes_written = 0

    def announce(self, msg: common_pb2.CudaRegion) -> None:
        """Map an announced region; ``InvalidArgument`` when it cannot be."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        with self._lock:
            if msg.name in self._regions:
                return
            if len(self._regions) >= self._max:
                raise InvalidArgument(f"too many CUDA IPC regions on one stream ({self._max})")
        index = self._local.get(msg.device_uuid)
        if index is None:
            raise InvalidArgument(
                f"CUDA IPC region {msg.name!r} lies on GPU {msg.device_uuid}, which this process cannot see "
                f"(it sees {sorted(self._local) or 'no GPU'})"
            )
        if msg.storage_bytes == 0 or not msg.handle:
            raise InvalidArgument(f"CUDA IPC region {msg.name!r} has no memory handle")
        try:
            buf = rebuild_cuda_tensor(  # type: ignore[no-untyped-call]
                torch.Tensor,
                (msg.storage_bytes,),
                (1,),
                0,
                torch.UntypedStorage,
                torch.uint8,
                index,
                msg.handle,
                msg.storage_bytes,
                msg.storage_offset,
                False,
                msg.ref_counter_handle,
                msg.ref_counter_offset,
                msg.event_handle or None,
                msg.event_sync_required,
            )
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"cannot map CUDA IPC region {msg.name!r}: {exc}") from None
        with self._lock:
            self._regions.setdefault(msg.name, _Mapped(buf))

    def buffer(self, name: str) -> torch.Tensor:
        """[size] uint8: the whole mapped region ``name`` (``InvalidArgument`` if it was not announced)."""
        return self._region(name, "fast link")

    def _region(self, name: str, what: str) -> torch.Tensor:
        with self._lock:
            mapped = self._regions.get(name)
        if mapped is None:
            raise InvalidArgument(f"{what}: CUDA IPC region {name!r} was not announced on this stream")
        return mapped.buf

    def decode(self, msg: common_pb2.Tensor, dims: list[int], what: str) -> torch.Tensor:
        """A validated zero-copy view of the rows ``msg.cuda_ipc`` references."""
        if not msg.HasField("cuda_ipc"):
            raise InvalidArgument(f"{what}: a shared-memory reference on the CUDA IPC data plane")
        buf = self._region(msg.cuda_ipc.region, what)
        ref, dtype = checked_ref(msg, "cuda_ipc", int(buf.numel()), dims, what)
        self.bytes_read += ref.nbytes
        return _view(buf, ref.offset, dtype, dims)

    def write_back(
        self, ref_msg: common_pb2.Tensor, result: torch.Tensor, ready: torch.cuda.Event | None
    ) -> common_pb2.Tensor:
        """Copy ``result`` over the rows ``ref_msg`` references, once ``ready`` (the computation) has
        happened; return when the copy is done, with the ``asap.v1.Tensor`` referencing the results."""
        dims = list(result.shape)
        buf = self._region(ref_msg.cuda_ipc.region, "combine result")
        ref, _ = checked_ref(ref_msg, "cuda_ipc", int(buf.numel()), dims, "combine result")
        stream = torch.cuda.current_stream(buf.device)
        if ready is not None:
            stream.wait_event(ready)
        _view(buf, ref.offset, result.dtype, dims).copy_(result, non_blocking=True)
        stream.synchronize()
        self.bytes_written += ref.nbytes
        return ref_tensor("cuda_ipc", result.dtype, dims, ref.region, ref.offset, ref.nbytes)

    def close(self) -> None:
        with self._lock:
            self._regions.clear()
