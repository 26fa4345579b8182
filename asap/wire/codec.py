"""Tensor codec: ``torch.Tensor`` <-> ``asap.v1.Tensor`` (dtype, shape, raw row-major bytes).

Costs, measured on the target protobuf (upb) runtime:

- ``encode_tensor`` makes exactly one copy of the payload (tensor memory -> ``bytes``); numpy's
  ``tobytes`` gathers a non-contiguous tensor in that same single pass. Assigning the ``bytes`` to the
  message copies once more inside protobuf; that copy is not ours to avoid.
- ``decode_tensor`` reads ``msg.data`` once (every access of a protobuf ``bytes`` field is a fresh copy)
  and wraps it with ``torch.frombuffer``, which does not copy.

The tensor returned by ``decode_tensor`` is backed by an immutable ``bytes`` object. Treat it as
read-only: in-place operations on it would mutate that object. Call ``.clone()`` first when a writable
tensor is needed.

Byte order is the host's; ASAP runs on little-endian hosts only, which is what the wire format specifies.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from asap.errors import InvalidArgument
from asap.v1 import common_pb2

__all__ = [
    "SUPPORTED_DTYPES",
    "RefDecoder",
    "decode_tensor",
    "dtype_from_proto",
    "dtype_to_proto",
    "encode_tensor",
]

_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: common_pb2.FLOAT32,
    torch.bfloat16: common_pb2.BFLOAT16,
    torch.float16: common_pb2.FLOAT16,
    torch.int32: common_pb2.INT32,
    torch.int64: common_pb2.INT64,
}
_FROM_WIRE: dict[int, torch.dtype] = {wire: dtype for dtype, wire in _TO_WIRE.items()}
_ITEMSIZE: dict[int, int] = {wire: dtype.itemsize for dtype, wire in _TO_WIRE.items()}

RefDecoder = Callable[[common_pb2.Tensor, list[int], str], torch.Tensor]
"""Resolves a tensor held in shared memory: (message, validated shape, what) -> tensor."""

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(_TO_WIRE)
"""Tensor element types the wire format carries."""

# numpy has no bfloat16: encode it through a same-size integer view, which (unlike a uint8 view) is valid
# for any strides, so non-contiguous tensors are still gathered in one copy.
_NUMPY_VIEW: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}

# torch.frombuffer warns that a ``bytes`` buffer is not writable. The warning is emitted once per process
# (TORCH_WARN_ONCE), so trigger it here under a local filter instead of paying for a
# ``catch_warnings`` (which is not thread-safe) on every decode.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def dtype_to_proto(dtype: torch.dtype) -> int:
    """Return the ``common_pb2.DType`` value of ``dtype``; raise ``InvalidArgument`` if unsupported."""
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} is not supported on the wire") from None


def dtype_from_proto(wire_dtype: int) -> torch.dtype:
    """Return the torch dtype of a ``common_pb2.DType`` value; raise ``InvalidArgument`` if unknown."""
    try:
        return _FROM_WIRE[wire_dtype]
    except KeyError:
        raise InvalidArgument(f"unknown wire dtype {wire_dtype}") from None


def encode_tensor(t: torch.Tensor) -> common_pb2.Tensor:
    """Encode ``t`` as a row-major ``asap.v1.Tensor`` with one copy of the payload.

    Tensors whose rows are strided (e.g. row slices) are gathered by that same copy. Tensors whose last
    dimension is strided (e.g. transposes) are made contiguous by torch first, which is measured faster
    than numpy's element-wise gather despite the extra copy. Tensors on another device are first moved
    to the CPU.
    """
    wire = dtype_to_proto(t.dtype)
    if t.device.type == "meta":  # emulated compute: no values exist, only the shape travels
        return common_pb2.Tensor(dtype=wire, shape=t.shape, shape_only=True)  # type: ignore[arg-type]
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dim() > 0 and t.stride(-1) != 1:
        t = t.contiguous()
    view = _NUMPY_VIEW.get(t.dtype)
    array = (t.view(view) if view is not None else t).numpy()
    return common_pb2.Tensor(dtype=wire, shape=t.shape, data=array.tobytes())  # type: ignore[arg-type]


def decode_tensor(
    msg: common_pb2.Tensor,
    *,
    dtype: torch.dtype | None = None,
    shape: Sequence[int | None] | None = None,
    what: str = "tensor",
    allow_shape_only: bool = False,
    refs: RefDecoder | None = None,
) -> torch.Tensor:
    """Decode ``msg`` without copying its payload; the result is read-only-backed (see module doc).

    ``dtype`` and ``shape`` (``None`` entries match any size) state what the caller expects. Any
    mismatch or inconsistency raises ``InvalidArgument`` naming ``what``; nothing else escapes, whatever
    the message holds. A tensor held in a same-host region (``msg.shm`` or ``msg.cuda_ipc``) is accepted
    only when ``refs`` (the receiver's data plane, see ``asap.dataplane``) is given; it validates the
    reference and resolves it.
    """
    actual = _FROM_WIRE.get(msg.dtype)
    if actual is None:
        raise InvalidArgument(f"{what}: unknown dtype {msg.dtype}")
    if dtype is not None and actual != dtype:
        raise InvalidArgument(f"{what}: dtype {actual} does not match the expected {dtype}")
    dims = list(msg.shape)
    if shape is not None:
        if len(dims) != len(shape):
            raise InvalidArgument(f"{what}: shape {dims} has rank {len(dims)}, expected rank {len(shape)}")
        for got, want in zip(dims, shape, strict=True):
            if want is not None and got != want:
                raise InvalidArgument(f"{what}: shape {dims} does not match the expected {list(shape)}")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: shape {dims} has a negative dimension")
    if msg.HasField("shm") or msg.HasField("cuda_ipc"):
        if refs is None:
            plane = "shm" if msg.HasField("shm") else "cuda-ipc"
            raise InvalidArgument(f"{what}: region references are accepted only with the {plane} data plane")
        return refs(msg, dims, what)
    if msg.shape_only:
        if not allow_shape_only:
            raise InvalidArgument(f"{what}: a shape-only tensor is accepted only with emulated compute")
        if msg.data:
            raise InvalidArgument(f"{what}: a shape-only tensor must carry no data")
        try:
            return torch.empty(dims, dtype=actual, device="meta")
        except (RuntimeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{what}: cannot build a tensor of shape {dims}: {exc}") from None
    expected = math.prod(dims) * _ITEMSIZE[msg.dtype]
    data = msg.data  # the one read: each access copies
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: {len(data)} data bytes, but shape {dims} of {actual} needs {expected} bytes"
        )
    try:
        if expected == 0:  # frombuffer rejects empty buffers
            return torch.empty(dims, dtype=actual)
        return torch.frombuffer(data, dtype=actual).view(dims)
    except (RuntimeError, ValueError, OverflowError) as exc:  # e.g. sizes whose strides overflow int64
        raise InvalidArgument(f"{what}: cannot build a tensor of shape {dims}: {exc}") from None
