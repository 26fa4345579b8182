"""Dispatch and combine chunks: the messages of one MoE layer on an ``Expert.Exchange`` stream.

An attention rank sends the token rows routed to one expert rank as ``DispatchChunk`` messages, split by
rows so no message exceeds ``max_chunk_bytes`` (grpc loopback throughput peaks at 1-4 MiB messages). Each
chunk is self-contained and answered by one ``CombineChunk`` covering the same rows; the attention rank
puts the answers back together with a ``CombineAssembler``.

"Chunk" here always means such a size-bounded piece of one layer's dispatch (or its answer). A prompt
prefilled in parts (``--mode sync-chunked``) is a different thing: see ``asap.model.chunked_prefill``.

All validation is per tensor (shape/dtype checks and one min/max reduction), never per row, because this
runs for every chunk of every layer.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from asap.errors import InternalError, InvalidArgument
from asap.rpc.status import error_from_wire, wire_error
from asap.syncstep import SyncStep
from asap.v1 import common_pb2, expert_pb2
from asap.wire.codec import RefDecoder, decode_tensor, encode_tensor

if TYPE_CHECKING:
    from asap.model.hosted import HostedCounts

__all__ = [
    "HEADER_ALLOWANCE",
    "MAX_CHUNK_BYTES",
    "CombineAssembler",
    "Dispatch",
    "combine_chunk",
    "decode_dispatch",
    "dispatch_bytes",
    "dispatch_chunks",
    "error_combine",
]

MAX_CHUNK_BYTES = 2 * 1024 * 1024
"""Default bound on the serialized size of one DispatchChunk."""

HEADER_ALLOWANCE = 256
"""Bytes reserved per chunk for everything but tensor payloads and trace strings (worst case ~190)."""


def dispatch_bytes(rows: int, hidden: int, top_k: int, dtype_bytes: int) -> int:
    """Payload bytes of ``rows`` dispatched rows: hidden [rows, hidden] in the model dtype plus int32
    ``expert_ids`` and float32 ``weights`` [rows, top_k], as ``dispatch_chunks`` sends them. Sizes the
    chunks and the emulated link's transfer time alike."""
    return rows * (hidden * dtype_bytes + top_k * (4 + 4))


@dataclass(slots=True)
class Dispatch:
    """A decoded, validated DispatchChunk. Tensors are read-only-backed (see ``asap.wire.codec``)."""

    micro_batch: int
    layer: int
    attention_rank: int
    row_offset: int
    total_rows: int
    hidden: torch.Tensor  # [n, H] model dtype
    expert_ids: torch.Tensor  # [n, K] int32 global ids, -1 = slot not on this rank
    weights: torch.Tensor  # [n, K] float32
    traceparent: str
    tracestate: str
    sent_unix_nanos: int
    sync: SyncStep | None = None
    """Sync modes: the global step; the dispatches of all its participants for (step, layer) are computed
    together. None = async."""
    hidden_ref: common_pb2.Tensor | None = None
    """Same-host data planes: the region reference the rows came by; results are written back there."""
    counted: HostedCounts | None = None
    """An in-process sender only (``asap.sim``; never decoded from a message): what its split counted of
    ``expert_ids`` for the receiving rank (``RankDispatch.counted``), taken in place of the rank's own
    count of the ids (``ExpertExecutor.counted``)."""

    @property
    def rows(self) -> int:
        """Number of token rows in this chunk."""
        return int(self.hidden.shape[0])


def dispatch_chunks(
    *,
    micro_batch: int,
    layer: int,
    attention_rank: int,
    hidden: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    traceparent: str = "",
    tracestate: str = "",
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    sync: SyncStep | None = None,
    place_hidden: Callable[[torch.Tensor], common_pb2.Tensor | None] | None = None,
) -> list[expert_pb2.DispatchChunk]:
    """Split one dispatch (``hidden`` [N, H], ``expert_ids`` / ``weights`` [N, K]) into chunks by rows.

    Every chunk serializes to at most ``max_chunk_bytes`` unless a single row is larger, in which case it
    holds one row. ``expert_ids`` are sent as int32 and ``weights`` as float32 (converted if needed).
    ``sync`` (the sync modes) marks the chunks as part of that global step; only then may N be 0.
    ``place_hidden`` (same-host data planes) may put a chunk's hidden rows into a region and return the
    referencing tensor message; None from it (or no hook) sends the rows inline.
    """
    if hidden.dim() != 2 or expert_ids.dim() != 2 or weights.dim() != 2:
        raise InvalidArgument(
            f"dispatch tensors must be 2-D, got hidden {list(hidden.shape)}, "
            f"expert_ids {list(expert_ids.shape)}, weights {list(weights.shape)}"
        )
    total = hidden.shape[0]
    if (total == 0 and sync is None) or expert_ids.shape[0] != total or weights.shape != expert_ids.shape:
        raise InvalidArgument(
            f"dispatch needs n > 0 rows (0 only in sync mode) and matching shapes, got hidden "
            f"{list(hidden.shape)}, expert_ids {list(expert_ids.shape)}, weights {list(weights.shape)}"
        )
    expert_ids = expert_ids.to(torch.int32)
    weights = weights.to(torch.float32)
    top_k = expert_ids.shape[1]
    row_bytes = dispatch_bytes(1, hidden.shape[1], top_k, hidden.element_size())
    budget = max_chunk_bytes - HEADER_ALLOWANCE - len(traceparent.encode()) - len(tracestate.encode())
    rows_per_chunk = max(1, budget // row_bytes)
    if hidden.device.type == "meta":
        # Emulated compute: no payload travels, so nothing to split; splitting would only turn one expert
        # call into several (each paying the call's launch floor).
        rows_per_chunk = max(total, 1)
    trace = common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate)
    step, sync_participants = SyncStep.to_wire(sync)
    chunks = []
    for start in range(0, max(total, 1), rows_per_chunk):  # an empty sync dispatch is one empty chunk
        end = min(start + rows_per_chunk, total)
        rows = hidden[start:end]
        placed = place_hidden(rows) if place_hidden is not None and end > start else None
        chunks.append(
            expert_pb2.DispatchChunk(
                micro_batch=micro_batch,
                layer=layer,
                row_offset=start,
                total_rows=total,
                hidden=placed if placed is not None else encode_tensor(rows),
                expert_ids=encode_tensor(expert_ids[start:end]),
                weights=encode_tensor(weights[start:end]),
                trace=trace,
                attention_rank=attention_rank,
                sent_unix_nanos=time.time_ns(),
                step=step,
                sync_participants=sync_participants,
            )
        )
    return chunks


def decode_dispatch(
    msg: expert_pb2.DispatchChunk,
    *,
    hidden_size: int,
    dtype: torch.dtype,
    num_layers: int,
    num_experts: int,
    top_k: int,
    allow_shape_only: bool = False,
    refs: RefDecoder | None = None,
) -> Dispatch:
    """Decode and validate one DispatchChunk against the model; raise ``InvalidArgument`` if malformed.

    Header checks run before any payload is read, so a bad header costs no copy. ``refs`` (a same-host data
    plane is enabled) lets the hidden rows be a region reference; no other tensor may be.
    """
    where = f"dispatch chunk (micro_batch {msg.micro_batch}, layer {msg.layer}, rows from {msg.row_offset})"
    if msg.layer >= num_layers:
        raise InvalidArgument(f"{where}: layer {msg.layer} out of range, the model has {num_layers} layers")
    hidden_shape = list(msg.hidden.shape)
    ids_shape = list(msg.expert_ids.shape)
    if len(hidden_shape) != 2 or len(ids_shape) != 2:
        raise InvalidArgument(f"{where}: hidden {hidden_shape} and expert_ids {ids_shape} must be 2-D")
    rows, k = hidden_shape[0], ids_shape[1]
    if rows < 0 or (rows == 0 and (msg.total_rows != 0 or msg.sync_participants == 0)):
        raise InvalidArgument(
            f"{where}: a chunk needs at least one row (0 only for an empty sync-mode dispatch), "
            f"got hidden {hidden_shape}"
        )
    if msg.row_offset + rows > msg.total_rows:
        raise InvalidArgument(
            f"{where}: rows {msg.row_offset}..{msg.row_offset + rows} exceed total_rows {msg.total_rows}"
        )
    if not 1 <= k <= top_k:
        raise InvalidArgument(f"{where}: expert_ids {ids_shape} must have 1..{top_k} (top_k) columns")
    hidden = decode_tensor(
        msg.hidden,
        dtype=dtype,
        shape=(rows, hidden_size),
        what=f"{where} hidden",
        allow_shape_only=allow_shape_only,
        refs=refs,
    )
    expert_ids = decode_tensor(msg.expert_ids, dtype=torch.int32, shape=(rows, k), what=f"{where} expert_ids")
    weights = decode_tensor(msg.weights, dtype=torch.float32, shape=(rows, k), what=f"{where} weights")
    if rows:
        low, high = torch.aminmax(expert_ids)
        if int(low) < -1 or int(high) >= num_experts:
            raise InvalidArgument(
                f"{where}: expert ids span [{int(low)}, {int(high)}], allowed are -1 and 0..{num_experts - 1}"
            )
    return Dispatch(
        micro_batch=msg.micro_batch,
        layer=msg.layer,
        attention_rank=msg.attention_rank,
        row_offset=msg.row_offset,
        total_rows=msg.total_rows,
        hidden=hidden,
        expert_ids=expert_ids,
        weights=weights,
        traceparent=msg.trace.traceparent,
        tracestate=msg.trace.tracestate,
        sent_unix_nanos=msg.sent_unix_nanos,
        sync=SyncStep.from_wire(msg.step, msg.sync_participants),
        hidden_ref=msg.hidden if msg.hidden.HasField("shm") or msg.hidden.HasField("cuda_ipc") else None,
    )


def combine_chunk(
    dispatch: Dispatch,
    hidden: torch.Tensor,
    *,
    queue_nanos: int = 0,
    compute_nanos: int = 0,
    barrier_nanos: int = 0,
    hidden_msg: common_pb2.Tensor | None = None,
) -> expert_pb2.CombineChunk:
    """Answer ``dispatch`` with its partial results ``hidden`` [n, H] (same rows, model dtype), inline or,
    given ``hidden_msg``, as that region reference to where they were written."""
    if hidden.dim() != 2 or hidden.shape[0] != dispatch.rows:
        raise InternalError(
            f"combine for micro_batch {dispatch.micro_batch} layer {dispatch.layer}: result shape "
            f"{list(hidden.shape)} does not cover the chunk's {dispatch.rows} rows"
        )
    return expert_pb2.CombineChunk(
        micro_batch=dispatch.micro_batch,
        layer=dispatch.layer,
        row_offset=dispatch.row_offset,
        total_rows=dispatch.total_rows,
        hidden=hidden_msg if hidden_msg is not None else encode_tensor(hidden),
        queue_nanos=queue_nanos,
        compute_nanos=compute_nanos,
        barrier_nanos=barrier_nanos,
    )


def error_combine(
    micro_batch: int, layer: int, row_offset: int, total_rows: int, code: str, message: str
) -> expert_pb2.CombineChunk:
    """Answer a dispatch chunk with an error (``code`` is a gRPC status code name) instead of rows."""
    return expert_pb2.CombineChunk(
        micro_batch=micro_batch,
        layer=layer,
        row_offset=row_offset,
        total_rows=total_rows,
        error=wire_error(code, message),
    )


class CombineAssembler:
    """Reassembles the CombineChunks answering one dispatch into a writable [total_rows, H] tensor.

    Parts may arrive in any order; each is copied into place on arrival, so the copy work overlaps with
    waiting for the rest. Optional ``micro_batch``/``layer`` are checked against every part when given.
    ``refs`` resolves parts written into the receiver's own regions (same-host data planes); ``device`` is
    where the assembled tensor lives (the copy out of a CUDA region is asynchronous on the current stream).
    """

    __slots__ = (
        "_dtype", "_empty_answered", "_ends", "_hidden_size", "_out", "_received", "_refs", "_starts",
        "barrier_ns", "layer", "micro_batch",
    )  # fmt: skip

    def __init__(
        self,
        total_rows: int,
        hidden_size: int,
        dtype: torch.dtype,
        *,
        micro_batch: int | None = None,
        layer: int | None = None,
        shape_only: bool = False,
        refs: RefDecoder | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if total_rows < 0 or hidden_size <= 0:
            raise InvalidArgument(f"assembler needs sizes >= 0, got {total_rows} x {hidden_size}")
        # [total_rows, H]; with emulated compute (shape_only) parts carry no values and neither does this
        self._out = torch.empty(total_rows, hidden_size, dtype=dtype, device="meta" if shape_only else device)
        self._refs = refs
        self.barrier_ns = 0
        """Sync mode: the longest time any part waited at the expert rank's barrier."""
        self._hidden_size = hidden_size
        self._dtype = dtype
        self._starts: list[int] = []  # sorted, disjoint row ranges received so far
        self._ends: list[int] = []
        self._received = 0
        self._empty_answered = False  # an empty sync dispatch is answered by one empty chunk
        self.micro_batch = micro_batch
        self.layer = layer

    @property
    def total_rows(self) -> int:
        """Rows of the whole dispatch."""
        return int(self._out.shape[0])

    @property
    def complete(self) -> bool:
        """Whether every row has arrived."""
        if self.total_rows == 0:
            return self._empty_answered
        return self._received == self.total_rows

    def add(self, msg: expert_pb2.CombineChunk) -> bool:
        """Place one part; return True once all rows have arrived.

        Raises the ``AsapError`` mapped from ``msg.error`` when the expert rank reported one (unknown
        codes map to ``InternalError``), and ``InvalidArgument`` for a part that does not fit.
        """
        start = msg.row_offset
        where = f"combine chunk (micro_batch {msg.micro_batch}, layer {msg.layer}, rows from {start})"
        if msg.HasField("error"):
            raise error_from_wire(msg.error, f"{where} failed on the expert rank")
        if (self.micro_batch is not None and msg.micro_batch != self.micro_batch) or (
            self.layer is not None and msg.layer != self.layer
        ):
            raise InvalidArgument(f"{where}: expected micro_batch {self.micro_batch} layer {self.layer}")
        if msg.total_rows != self.total_rows:
            raise InvalidArgument(f"{where}: total_rows {msg.total_rows}, expected {self.total_rows}")
        self.barrier_ns = max(self.barrier_ns, msg.barrier_nanos)
        shape = msg.hidden.shape
        rows = shape[0] if len(shape) == 2 else -1
        end = start + rows
        if self.total_rows == 0 and rows == 0 and start == 0:
            self._empty_answered = True
            return True
        if rows <= 0 or end > self.total_rows:
            raise InvalidArgument(f"{where}: shape {list(shape)} does not fit in {self.total_rows} rows")
        i = bisect.bisect_right(self._starts, start)
        if (i > 0 and self._ends[i - 1] > start) or (i < len(self._starts) and self._starts[i] < end):
            raise InvalidArgument(f"{where}: rows {start}..{end} overlap rows already received")
        shape_only = self._out.device.type == "meta"
        part = decode_tensor(
            msg.hidden,
            dtype=self._dtype,
            shape=(rows, self._hidden_size),
            what=where,
            allow_shape_only=shape_only,
            refs=self._refs,
        )
        if not shape_only:
            self._out[start:end].copy_(part, non_blocking=part.device.type == "cuda")
        self._starts.insert(i, start)
        self._ends.insert(i, end)
        self._received += rows
        return self.complete

    def result(self) -> torch.Tensor:
        """The assembled [total_rows, H] tensor; raises ``InternalError`` if rows are missing."""
        if not self.complete:
            raise InternalError(f"combine incomplete: {self._received} of {self.total_rows} rows received")
        return self._out
