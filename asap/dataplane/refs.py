"""References into same-host regions (``asap.v1.RegionRef``), shared by the shm and CUDA IPC planes:
the tensor message that points into a region, and the validation of one received."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from asap.errors import InvalidArgument
from asap.v1 import common_pb2
from asap.wire.codec import dtype_from_proto, dtype_to_proto

__all__ = ["checked_ref", "ref_tensor"]


def ref_tensor(
    field: str, dtype: torch.dtype, shape: Sequence[int], region: str, offset: int, nbytes: int
) -> common_pb2.Tensor:
    """An ``asap.v1.Tensor`` of ``dtype`` and ``shape`` whose values lie in ``region`` at ``offset``;
    ``field`` is the plane's field, ``shm`` or ``cuda_ipc``."""
    msg = common_pb2.Tensor(dtype=dtype_to_proto(dtype), shape=list(shape))  # type: ignore[arg-type]
    getattr(msg, field).CopyFrom(common_pb2.RegionRef(region=region, offset=offset, nbytes=nbytes))
    return msg


def checked_ref(
    msg: common_pb2.Tensor, field: str, region_size: int, dims: list[int], what: str
) -> tuple[common_pb2.RegionRef, torch.dtype]:
    """The reference ``msg.<field>`` and its dtype, once it is known to cover exactly ``dims`` of the
    dtype, inside a region of ``region_size`` bytes, aligned, with no inline data beside it; else
    ``InvalidArgument`` naming ``what``."""
    ref: common_pb2.RegionRef = getattr(msg, field)
    dtype = dtype_from_proto(msg.dtype)
    expected = math.prod(dims) * dtype.itemsize
    if msg.data or msg.shape_only:
        raise InvalidArgument(f"{what}: a tensor held in a region must carry no inline data")
    if ref.nbytes != expected:
        raise InvalidArgument(
            f"{what}: a region reference of {ref.nbytes} bytes does not fit shape {dims} of {dtype} "
            f"({expected} bytes)"
        )
    if ref.offset + ref.nbytes > region_size:
        raise InvalidArgument(
            f"{what}: range {ref.offset}..{ref.offset + ref.nbytes} is outside region {ref.region!r} "
            f"of {region_size} bytes"
        )
    if ref.offset % dtype.itemsize:
        raise InvalidArgument(f"{what}: offset {ref.offset} is not aligned to {dtype}")
    return ref, dtype
