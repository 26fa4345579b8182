"""Ready flags on the GPU: 32-bit words in CUDA IPC memory that CUDA streams write and wait on.

Why: a host that waits for its GPU before telling the peer, and a peer host that waits for the message
before launching, cost milliseconds per MoE layer (DESIGN.md §9). Instead the sender's *stream* writes a
slot's flag after the rows (``cuStreamWriteValue32``) and the receiver's *stream* waits for it
(``cuStreamWaitValue32``): both are enqueued in microseconds and no host thread waits for a GPU.

Values: a flag holds the sequence number of the last dispatch that passed it (32 bits, wrapping). A wait
for ``seq`` passes once ``(int32)(flag - seq) >= 0`` (the driver's ``GEQ``, cyclic), so sequence numbers
may wrap. A flag a dead peer will never write is *poisoned*: the host that learns of the death writes
``poison_value(last_seq)``, far ahead of every sequence number in use, so every stream waiting on it
drains; the batches waiting on that link fail on the host (``Unavailable``), never on the stream. A
poisoned region is retired, never reused.

``DriverFlags`` calls the CUDA driver through ``cuda.bindings`` (on the GPU image; optional here);
``flags_available`` says whether it can. Tests without a GPU use a fake with the same two methods.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import torch

from asap.errors import InternalError

__all__ = [
    "POISON_STEP",
    "DriverFlags",
    "StreamFlags",
    "driver_flags",
    "flags_available",
    "passes",
    "poison_value",
    "write_words",
]

POISON_STEP = 1 << 30
"""How far ahead of the last sequence number a poison value lies (any wait of the link then passes)."""
_MASK = 0xFFFFFFFF
_PARAMS_KEPT = 1024
"""Address lists whose batch parameters a thread keeps (a link's slots: a few per link)."""
logger = logging.getLogger(__name__)


def poison_value(last_seq: int) -> int:
    """The value that releases every wait for a sequence number up to ``last_seq`` (and some way past)."""
    return (last_seq + POISON_STEP) & _MASK


def passes(flag: int, seq: int) -> bool:
    """Whether a stream waiting for ``seq`` passes a flag holding ``flag`` (the driver's cyclic GEQ)."""
    diff = (flag - seq) & _MASK
    return diff < (1 << 31)


class StreamFlags(Protocol):
    """Enqueue flag writes and waits on a stream (both return at once)."""

    def write(self, stream: torch.cuda.Stream, address: int, value: int) -> None: ...

    def wait(self, stream: torch.cuda.Stream, address: int, value: int) -> None: ...


def _driver() -> Any:
    from cuda.bindings import driver  # type: ignore[import-not-found,unused-ignore]

    return driver


def flags_available() -> bool:
    """Whether this process can use stream flags: CUDA with the ``cuda.bindings`` driver module."""
    if not torch.cuda.is_available():
        return False
    try:
        _driver()
    except ImportError:
        return False
    return True


class DriverFlags:
    """``StreamFlags`` through ``cuda.bindings.driver`` (the primary context PyTorch made current)."""

    def __init__(self) -> None:
        self._d = _driver()
        self._success = self._d.CUresult.CUDA_SUCCESS
        self._check(self._d.cuInit(0), "cuInit")
        self._geq = int(self._d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
        self._default = int(self._d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
        self._batch_ok = True
        """Whether ``cuStreamBatchMemOp`` works here (else ``write_words`` writes word by word)."""
        self._threads = threading.local()
        self._handles: dict[int, tuple[Any, int]] = {}
        """Stream handle (``cuda_stream``) -> (its driver ``CUstream``, its device index)."""

    def _on_this_thread(self, stream: torch.cuda.Stream) -> Any:
        """The driver API needs a current context on the calling thread (a poll thread may never have
        made a CUDA call): make the stream's device's primary context current, once per thread. Returns
        the stream's driver handle (cached: these calls are on the per-layer path)."""
        handle = self._handles.get(stream.cuda_stream)
        ready: set[int] | None = getattr(self._threads, "devices", None)
        if handle is not None and ready is not None and handle[1] in ready:
            return handle[0]
        index = stream.device.index if stream.device.index is not None else 0
        if ready is None:
            ready = self._threads.devices = set()
        if index not in ready:
            torch.cuda.set_device(index)
            ready.add(index)
        handle = (self._d.CUstream(stream.cuda_stream), index)
        self._handles[stream.cuda_stream] = handle
        return handle[0]

    def _check(self, result: Any, what: str) -> None:
        err = result[0] if isinstance(result, tuple) else result
        if err != self._success:
            raise InternalError(f"{what} failed: {err}")

    def write(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        d = self._d
        handle = self._on_this_thread(stream)
        self._check(
            d.cuStreamWriteValue32(handle, d.CUdeviceptr(address), value & _MASK, self._default),
            "cuStreamWriteValue32",
        )

    def write_words(self, stream: torch.cuda.Stream, writes: list[tuple[int, int]]) -> None:
        """Enqueue the 32-bit writes (address, value) in order, each after the memory barrier of a
        default stream write (so the last one, a flag, is seen only after the others and all earlier
        work of the stream): one ``cuStreamBatchMemOp`` (one driver call instead of a copy and a
        write), or, where that fails, the writes one by one. (``CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER``
        is refused with ``CUDA_ERROR_INVALID_VALUE`` by driver 580 / cuda.bindings 13: not used.)"""
        d = self._d
        handle = self._on_this_thread(stream)
        if self._batch_ok:
            try:
                params = self._batch_params(tuple(address for address, _ in writes))
                for p, (_, value) in zip(params, writes, strict=True):
                    p.writeValue.value = value & _MASK
                result = d.cuStreamBatchMemOp(handle, len(params), params, 0)
                err = result[0] if isinstance(result, tuple) else result
                if err == self._success:
                    return
                raise RuntimeError(f"cuStreamBatchMemOp failed: {err}")  # (nothing was enqueued)
            except Exception:
                logger.warning("cuStreamBatchMemOp unusable here; stream writes one by one", exc_info=True)
                self._batch_ok = False
        for address, value in writes:
            self._check(
                d.cuStreamWriteValue32(
                    handle,
                    d.CUdeviceptr(address),
                    value & _MASK,
                    self._default,
                ),
                "cuStreamWriteValue32",
            )

    def _batch_params(self, addresses: tuple[int, ...]) -> list[Any]:
        """The calling thread's ``cuStreamBatchMemOp`` parameters for writes to ``addresses`` (built once
        per address list and kept, at most ``_PARAMS_KEPT`` lists per thread: a slot's step words and
        flag are the same addresses on every layer; only the values change). The driver reads them
        during the call, so reusing them on the same thread is safe."""
        kept: dict[tuple[int, ...], list[Any]] | None = getattr(self._threads, "batch_params", None)
        if kept is None:
            kept = self._threads.batch_params = {}
        params = kept.get(addresses)
        if params is None:
            d = self._d
            op = d.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WRITE_VALUE_32
            params = []
            for address in addresses:
                p = d.CUstreamBatchMemOpParams()
                p.operation = op
                p.writeValue.operation = op
                p.writeValue.address = d.CUdeviceptr(address)
                p.writeValue.flags = self._default
                params.append(p)
            if len(kept) < _PARAMS_KEPT:
                kept[addresses] = params
        return params

    def wait(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        d = self._d
        handle = self._on_this_thread(stream)
        self._check(
            d.cuStreamWaitValue32(handle, d.CUdeviceptr(address), value & _MASK, self._geq),
            "cuStreamWaitValue32",
        )


def write_words(flags: StreamFlags, stream: torch.cuda.Stream, writes: list[tuple[int, int]]) -> None:
    """``DriverFlags.write_words`` where ``flags`` has it, else its ``write`` for each (test fakes)."""
    many = getattr(flags, "write_words", None)
    if many is not None:
        many(stream, writes)
        return
    for address, value in writes:
        flags.write(stream, address, value)


_FLAGS: DriverFlags | None = None
_LOCK = threading.Lock()


def driver_flags() -> DriverFlags:
    """The process's one ``DriverFlags``."""
    global _FLAGS
    with _LOCK:
        if _FLAGS is None:
            _FLAGS = DriverFlags()
        return _FLAGS
