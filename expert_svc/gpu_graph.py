"""The expert step of a GPU fast link as one captured CUDA graph per (slot, row bucket, layer window).

Why: enqueueing the eager step (ids translated on the device, the bucket's static copies, the routine's
graph, the clone, the copy back: ~30 PyTorch calls) cost the expert host ~0.5 ms per layer on an H200
host, three times the device time of a 1k-token step. Captured, the step is one graph launch.

The graph reads the rows, ids and weights straight from the slot and writes the results over the rows.
For that the slot's layout must depend on the bucket only: both ends of a GPU link lay a dispatch of
``rows`` rows out as one of ``gpu_layout_rows(geometry, rows)`` (``asap.dataplane.gpu_layout``), the next
token bucket when it fits the slot. The dispatch's row count, layer and sequence number reach the graph
through three device words of the slot that the attention's stream writes before the request flag
(``STEP_WORDS_AT``). The graph *checks them on the device*: it computes only if the row count falls in
its bucket, the layer in its window, and the request flag holds the words' sequence number; otherwise
every row is masked and nothing is written (the results are ``where(valid, out, rows)``). That is what
lets the expert rank enqueue a slot's next step before its descriptor arrives (``gpu_fastlane``: armed
steps): a step armed for the wrong bucket or window, or released by a poisoned flag, is a no-op, and
the host then launches the right one behind it. Rows past the count hold whatever the slot held before:
their ids are masked to -1 (never gathered nor computed, nor counted as ids not hosted here). The
results equal the eager path's bit for bit: the same routine on the same bucket shape.

Kernels run once per (bucket, window) on scratch memory in ``warm`` (before SERVING); the graphs are
captured when a link attaches (its slots' addresses are known only then), with nothing executed, so a
dispatch the attention rank already wrote is never touched. Shapes outside the buckets (more rows than
the largest captured bucket, a bucket that does not fit the slot) take the eager path. Graphs of one
slot share a memory pool; with ``pool_per_slot`` each slot has its own (their streams run concurrently).

With the routine's Triton kernels (the default on CUDA with Triton), the checks, masks and id
translation are one kernel and the results are written straight over the slot's valid rows
(``expert_svc.gpu_step_triton``): ~20 small launches fewer per step. ``ASAP_GPU_FUSED_STEP=0`` keeps the
torch-op step (the comparison of ``benchmarks/gpu_fast14.sh``).

``ASAP_GPU_STEP_GRAPHS=0`` turns the captured step off (the eager path for every dispatch);
``ASAP_GPU_STEP_GRAPH_ROWS`` bounds the largest bucket captured (memory and capture time per link).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from asap.dataplane.fastlink import DONE_FLAG_AT, REQUEST_FLAG_AT, LinkGeometry
from asap.dataplane.gpu_layout import STEP_WORDS_AT, env_switch, gpu_layout_rows
from asap.model.expert_part import ExpertPart
from asap.model.grouped import BUCKETS, LayerAgnosticExperts, bucket_for, grouped_mm_available

__all__ = [
    "FUSED_STEP_ENV",
    "STEP_GRAPHS_ENV",
    "STEP_GRAPH_ROWS_ENV",
    "StepGraphs",
    "StepKey",
    "graph_buckets",
    "slot_words",
    "step_graph_rows",
    "step_graphs_enabled",
    "step_key",
]

STEP_GRAPHS_ENV = "ASAP_GPU_STEP_GRAPHS"
"""``0`` (or ``off``): the GPU fast lane enqueues every step eagerly; default on."""
FUSED_STEP_ENV = "ASAP_GPU_FUSED_STEP"
"""``0`` (or ``off``): the step's checks and masks as torch ops even where the Triton kernels run."""
STEP_GRAPH_ROWS_ENV = "ASAP_GPU_STEP_GRAPH_ROWS"
"""The largest token bucket captured per slot (default 16384)."""
_DEFAULT_ROWS = 16384

StepKey = tuple[int, int, int]
"""(slot, bucket, window) of one captured step."""


def step_graphs_enabled(environ: dict[str, str] | None = None) -> bool:
    return env_switch(STEP_GRAPHS_ENV, True, environ)


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


def slot_words(buf: torch.Tensor, geometry: LinkGeometry, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step words (int32 [3]: rows, layer, seq) and the request flag (int32 [1]) of ``slot``."""
    base = geometry.device_slot_at(slot)
    words = buf[base + STEP_WORDS_AT : base + STEP_WORDS_AT + 12].view(torch.int32)
    flag = buf[base + REQUEST_FLAG_AT : base + REQUEST_FLAG_AT + 4].view(torch.int32)
    return words, flag


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
    """The lane's capturable step (one routine; graph memory pools per link or per slot)."""

    @staticmethod
    def supported(part: ExpertPart) -> bool:
        """The grouped-GEMM routine (CUDA sm90+, bf16, layer-agnostic): what ``ExpertPart`` graphs too."""
        return part.layer_agnostic and part.dtype == torch.bfloat16 and grouped_mm_available(part.device)

    def __init__(self, part: ExpertPart, bad_ids: torch.Tensor, *, largest: int) -> None:
        self.part = part
        self.device = part.device
        self.largest = bucket_for(max(1, largest))
        self.bad_ids = bad_ids
        self.routine = LayerAgnosticExperts(part.gate_up, part.down)
        self.fused = self.routine.kernels == "triton" and env_switch(FUSED_STEP_ENV, True)
        """The checks in one Triton kernel, the results written in place (``gpu_step_triton``)."""
        self.windows = len(self.routine.windows)
        self._window_of = {
            layer: self.routine.locate(stacked) for stacked, layer in enumerate(part.config.moe_layer_ids)
        }
        self._layer_in = {window: layer for layer, (window, _) in reversed(self._window_of.items())}
        """One MoE layer of each window (the warm-up's words)."""
        top = max(self._window_of, default=0) + 1
        table = torch.full((top + 1, 2), -1, dtype=torch.int64)  # the last row: any layer out of range
        for layer, (window, inner) in self._window_of.items():
            table[layer, 0], table[layer, 1] = window, inner
        self._table = table.to(self.device)
        """Per layer id: (window, layer within it); -1 for layers that are not MoE layers here."""
        self._below = {b: (BUCKETS[i - 1] if i else 0) for i, b in enumerate(BUCKETS)}
        self._row_index = torch.arange(self.largest, dtype=torch.int64, device=self.device).view(-1, 1)
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    def locate(self, layer: int) -> tuple[int, int]:
        """(window, layer within it) of an MoE layer."""
        return self._window_of[layer]

    def run(
        self,
        window: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        words: torch.Tensor,
        flag: torch.Tensor,
        done: torch.Tensor | None = None,
    ) -> None:
        """The step on ``bucket`` rows (views of a slot) if the slot's ``words`` (rows, layer, seq) name
        this bucket and window and ``flag`` holds their seq, else a no-op; rows past the count skipped,
        the results written over ``hidden``, then (``done`` given) the slot's done flag set to the seq.
        Only stream-ordered device work: capturable."""
        bucket = hidden.shape[0]
        if self.fused:
            from expert_svc import gpu_step_triton as kernels  # lazy: Triton is optional

            local, kept, inner, count = kernels.prologue(
                words,
                flag,
                self._table,
                self.part.device_lut(),
                ids,
                weights,
                below=self._below[bucket],
                window=window,
                bad_ids=self.bad_ids,
            )
            self.routine.run_window(window, inner, hidden, local, kept, out=hidden, count=count)
            if done is not None:  # after the results (stream order, same GPU): the peer may copy them out
                kernels.publish_done(count, flag, done)
            return
        rows, layer = words[0].to(torch.int64), words[1].to(torch.int64)
        top = self._table.shape[0] - 1
        at = torch.where((layer >= 0) & (layer < top), layer, top).view(1)
        entry = self._table.index_select(0, at)[0]  # (a 0-d tensor index would read it on the host)
        match = (rows > self._below[bucket]) & (rows <= bucket) & (entry[0] == window) & (flag[0] == words[2])
        count = torch.where(match, rows, 0)
        inner = torch.where(match, entry[1], 0)
        valid = self._row_index[:bucket] < count
        local, bad = self.part.device_local_ids(torch.where(valid, ids, -1))
        self.bad_ids.add_(bad.sum())
        kept = torch.where(valid, weights, 0.0)
        out = self.routine.run_window(window, inner, hidden, local, kept)
        torch.where(valid, out, hidden, out=hidden)  # (rows left as they were where not valid)
        if done is not None:  # after the results (stream order, same GPU): the peer may copy them out
            torch.where(match, flag, done, out=done)

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
        words = torch.zeros(3, dtype=torch.int32, device=self.device)
        flag = torch.ones(1, dtype=torch.int32, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        for bucket in buckets:
            for window in range(self.windows):
                words.copy_(torch.tensor([bucket, self._layer_in.get(window, 0), 1], dtype=torch.int32))
                self.run(window, hidden[:bucket], ids[:bucket], weights[:bucket], words, flag)
        stream.synchronize()

    def capture(
        self,
        buf: torch.Tensor,
        geometry: LinkGeometry,
        buckets: Sequence[int],
        between: Callable[[], None] = lambda: None,
        *,
        pool_per_slot: bool = False,
        device_done: bool = False,
    ) -> dict[StepKey, torch.cuda.CUDAGraph]:
        """The graphs of every (slot, bucket, window) of a link whose slots' memory is ``buf``; nothing
        runs (``between`` after each capture: the caller's heartbeat). Any thread: captures on a side
        stream in thread-local mode, so other threads' launches meanwhile are fine. ``pool_per_slot``:
        one memory pool per slot (each slot's graphs replayed on the slot's own stream, concurrently
        with other slots'), else the lane's one pool (every graph replayed on one stream). ``device_done``:
        the step writes the slot's done flag itself when it computed (the slots on this GPU)."""
        graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            for slot in range(geometry.slots):
                pool = torch.cuda.graph_pool_handle() if pool_per_slot else self._pool
                words, flag = slot_words(buf, geometry, slot)
                base = geometry.device_slot_at(slot) + DONE_FLAG_AT
                done = buf[base : base + 4].view(torch.int32) if device_done else None
                for bucket in buckets:
                    hidden, ids, weights = _views(buf, geometry, slot, bucket, self.part.dtype)
                    for window in range(self.windows):
                        graph = torch.cuda.CUDAGraph()
                        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                        try:
                            self.run(window, hidden, ids, weights, words, flag, done)
                        finally:
                            graph.capture_end()
                        graphs[(slot, bucket, window)] = graph
                        between()
        return graphs
