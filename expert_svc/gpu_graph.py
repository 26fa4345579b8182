"""The expert step of a GPU fast link as one captured CUDA graph per (slot, row bucket, layer window).

Why: enqueueing the eager step (ids translated on the device, the bucket's static copies, the routine's
graph, the clone, the copy back: ~30 PyTorch calls) cost the expert host ~0.5 ms per layer on an H200
host, three times the device time of a 1k-token step. Captured, the step is five driver calls: the wait
for the request flag, two 32-bit stream writes (the row count and the layer within its window, into
device words the graph reads), the graph launch, and the done flag.

The graph reads the rows, ids and weights straight from the slot and writes the results over the rows.
For that the slot's layout must depend on the bucket only: both ends of a GPU link lay a dispatch of
``rows`` rows out as one of ``gpu_layout_rows(geometry, rows)`` (``asap.dataplane.gpu_layout``), the next
token bucket when it fits the slot. The rows past ``rows`` hold whatever the slot held before: the
graph masks their ids to -1 (skipped: never gathered nor computed) by the row count it reads on the
device, so they cannot reach the results, nor count as ids not hosted here. The results equal the eager
path's bit for bit: the same routine on the same bucket shape (``GraphedExperts`` pads the same way).

Kernels run once per (bucket, window) on scratch memory in ``warm`` (before SERVING); the graphs are
captured when a link attaches (its slots' addresses are known only then), with nothing executed, so a
dispatch the attention rank already wrote is never touched. Shapes outside the buckets (more rows than
the largest captured bucket, a bucket that does not fit the slot) take the eager path.

``ASAP_GPU_STEP_GRAPHS=0`` turns the captured step off (the eager path for every dispatch);
``ASAP_GPU_STEP_GRAPH_ROWS`` bounds the largest bucket captured (memory and capture time per link).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.gpu_layout import gpu_layout_rows
from asap.model.expert_part import ExpertPart
from asap.model.grouped import BUCKETS, LayerAgnosticExperts, bucket_for, grouped_mm_available

__all__ = [
    "STEP_GRAPHS_ENV",
    "STEP_GRAPH_ROWS_ENV",
    "StepGraphs",
    "StepKey",
    "graph_buckets",
    "step_graph_rows",
    "step_graphs_enabled",
    "step_key",
]

STEP_GRAPHS_ENV = "ASAP_GPU_STEP_GRAPHS"
"""``0`` (or ``off``): the GPU fast lane enqueues every step eagerly; default on."""
STEP_GRAPH_ROWS_ENV = "ASAP_GPU_STEP_GRAPH_ROWS"
"""The largest token bucket captured per slot (default 16384)."""
_DEFAULT_ROWS = 16384

StepKey = tuple[int, int, int]
"""(slot, bucket, window) of one captured step."""


def step_graphs_enabled(environ: dict[str, str] | None = None) -> bool:
    value = (environ if environ is not None else os.environ).get(STEP_GRAPHS_ENV, "1").strip().lower()
    return value not in ("0", "off", "false", "no")


def step_graph_rows(environ: dict[str, str] | None = None) -> int:
    raw = (environ if environ is not None else os.environ).get(STEP_GRAPH_ROWS_ENV, "")
    return int(raw) if raw.strip() else _DEFAULT_ROWS


def graph_buckets(geometry: LinkGeometry, largest: int) -> tuple[int, ...]:
    """The buckets whose steps are captured for a link: at most ``largest`` rows, laid out as the bucket
    in the slot (so the graph's views are fixed), and no more rows than a slot takes."""
    limit = geometry.max_rows(shape_only=False)
    return tuple(b for b in BUCKETS if b <= largest and b <= limit and gpu_layout_rows(geometry, b) == b)


def step_key(
    geometry: LinkGeometry, buckets: Sequence[int], slot: int, rows: int, window: int
) -> StepKey | None:
    """The captured step a dispatch of ``rows`` rows in ``slot`` replays, or None (the eager path)."""
    if rows <= 0:
        return None
    bucket = bucket_for(rows)
    if bucket not in buckets or gpu_layout_rows(geometry, rows) != bucket:
        return None
    return slot, bucket, window


def _views(
    buf: torch.Tensor, geometry: LinkGeometry, slot: int, bucket: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, ids and weights of ``bucket`` rows of ``slot`` in the slots' memory ``buf`` (uint8)."""
    g = geometry
    hidden_at, ids_at, weights_at, _ = g.payload(bucket, shape_only=False)
    base = g.device_slot_at(slot)

    def view(offset: int, dt: torch.dtype, width: int) -> torch.Tensor:
        start = base + offset
        return buf[start : start + bucket * width * dt.itemsize].view(dt).view(bucket, width)

    return (
        view(hidden_at, dtype, g.hidden_size),
        view(ids_at, torch.int32, g.top_k),
        view(weights_at, torch.float32, g.top_k),
    )


class StepGraphs:
    """The lane's capturable step (one routine, two device words, one memory pool for every graph)."""

    @staticmethod
    def supported(part: ExpertPart) -> bool:
        """The grouped-GEMM routine (CUDA sm90+, bf16, layer-agnostic): what ``ExpertPart`` graphs too."""
        return part.layer_agnostic and part.dtype == torch.bfloat16 and grouped_mm_available(part.device)

    def __init__(self, part: ExpertPart, bad_calls: torch.Tensor, *, largest: int) -> None:
        self.part = part
        self.device = part.device
        self.largest = bucket_for(max(1, largest))
        self.bad_calls = bad_calls
        self.routine = LayerAgnosticExperts(part.gate_up, part.down)
        self.windows = len(self.routine.windows)
        self._window_of = {
            layer: self.routine.locate(stacked) for stacked, layer in enumerate(part.config.moe_layer_ids)
        }
        self.words = torch.zeros(2, dtype=torch.int64, device=self.device)
        """[0]: the dispatch's row count, [1]: its layer within the window (low 32 bits written by the
        stream before each launch; the high words stay 0)."""
        self.rows_at = int(self.words.data_ptr())
        self.inner_at = self.rows_at + 8
        self._row_index = torch.arange(self.largest, dtype=torch.int64, device=self.device).view(-1, 1)
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def locate(self, layer: int) -> tuple[int, int]:
        """(window, layer within it) of an MoE layer."""
        return self._window_of[layer]

    def run(self, window: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """The step on ``bucket`` rows (views of a slot): rows past the count in ``words[0]`` skipped, the
        results written over ``hidden``. Only stream-ordered device work: capturable."""
        bucket = hidden.shape[0]
        valid = self._row_index[:bucket] < self.words[0]
        local, bad = self.part.device_local_ids(torch.where(valid, ids, -1))
        self.bad_calls.add_(bad.any())
        kept = torch.where(valid, weights, 0.0)
        out = self.routine.run_window(window, self.words[1], hidden, local, kept)
        hidden.copy_(out)

    def warm(self, buckets: Sequence[int]) -> None:
        """Run every (bucket, window) step once on scratch memory (kernel loads, Triton compilation,
        allocator blocks) so captures at attach time execute nothing new. On the compute thread."""
        if not buckets:
            return
        h, k = self.part.config.hidden_size, self.part.config.top_k
        top = max(buckets)
        hidden = torch.zeros(top, h, dtype=self.part.dtype, device=self.device)
        ids = torch.full((top, k), -1, dtype=torch.int32, device=self.device)
        ids[:, 0] = self.part.hosted[0]
        weights = torch.zeros(top, k, dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        for bucket in buckets:
            self.words[0].fill_(bucket)
            for window in range(self.windows):
                self.words[1].fill_(0)
                self.run(window, hidden[:bucket], ids[:bucket], weights[:bucket])
        self.words.zero_()
        stream.synchronize()

    def capture(
        self,
        buf: torch.Tensor,
        geometry: LinkGeometry,
        buckets: Sequence[int],
        between: Callable[[], None] = lambda: None,
    ) -> dict[StepKey, torch.cuda.CUDAGraph]:
        """The graphs of every (slot, bucket, window) of a link whose slots' memory is ``buf``; nothing
        runs (``between`` after each capture: the caller's heartbeat). Any thread: captures on a side
        stream in thread-local mode, so other threads' launches meanwhile are fine."""
        graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for slot in range(geometry.slots):
                for bucket in buckets:
                    hidden, ids, weights = _views(buf, geometry, slot, bucket, self.part.dtype)
                    for window in range(self.windows):
                        graph = torch.cuda.CUDAGraph()
                        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                        try:
                            self.run(window, hidden, ids, weights)
                        finally:
                            graph.capture_end()
                        graphs[(slot, bucket, window)] = graph
                        between()
        return graphs
