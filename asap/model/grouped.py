"""The layer-agnostic grouped-GEMM expert routine (the "super kernel" of the ASAP paper).

Expert weights of all MoE layers are stacked into one array of ``L * E`` expert groups. A call takes the
layer as *data* (a 0-d device tensor): token rows are sorted by the group ``slot * E + expert``, and two
grouped GEMMs over the whole stack compute every (layer, expert) group at once; groups of other layers
simply receive no rows. Every shape depends only on the number of token rows, and nothing synchronises
with the host, so on CUDA one captured graph per token-count bucket replays for any layer — consecutive
calls for unpredictable layers need no per-layer set-up or Python dispatch.

``torch._grouped_mm`` (CUDA, bf16) does the GEMMs. It takes at most ``MAX_GROUPS`` groups, so the stack is
cut into windows of whole layers that fit (e.g. 31 layers of 32 experts); the window is chosen on the host
and the layer within it is data, so a model needs one graph per bucket per window (2 for 48 layers of a
32-expert shard) instead of one per layer. Elsewhere the same code path runs with a per-group loop
fallback so results can be checked on CPU.

Two implementations of the steps around the GEMMs can be picked per routine (``kernels=``, or the
``ASAP_GROUPED_KERNELS`` environment variable, ``eager`` or ``triton``): ``eager`` chains torch ops (a
full gather, silu/mul/scale temporaries, a masked fill, an inverse-permutation gather and a float32 view
sum, each a pass over ``N*K`` rows); ``triton`` (``asap.model.grouped_triton``, CUDA with Triton
installed, the default there) does the gather, the activation and the weighted un-permute + K-way sum in
three kernels that touch only the valid sorted rows, whose count they read from device memory.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

MAX_GROUPS = 1023
"""Groups one ``torch._grouped_mm`` call accepts (it refuses 1024 and more)."""

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
"""Token-count buckets: a call is padded up to the next bucket so few graphs cover all sizes."""


def grouped_mm_available(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` can run on ``device`` (CUDA with sm90+ and a recent torch)."""
    if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9


LARGE_TILE_ROWS = 192
"""Slots per expert (N*K / E) from which the Triton path pads the GEMM rows to get the large GEMM tile.
Measured on an H200 (48 layers, E = 64 or 128): the large tile wins from about 256 valid slots per expert
(by 15-20% at 4k-8k tokens), loses below about 128 (a 64-expert shard whose slots are half valid loses
7% at 1024 tokens, where all 128 experts on one rank win 7% at 2048 tokens)."""

KERNELS_ENV = "ASAP_GROUPED_KERNELS"
"""Environment variable picking the default kernels (``eager`` or ``triton``) when none is given."""


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: Triton installed, and CUDA (or, for tests,
    Triton's CPU interpreter switched on with ``TRITON_INTERPRET=1``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _default_kernels(device: torch.device) -> str:
    chosen = os.environ.get(KERNELS_ENV, "")
    if chosen:
        if chosen not in ("eager", "triton"):
            raise ValueError(f"{KERNELS_ENV}={chosen!r}: expected 'eager' or 'triton'")
        return chosen
    return "triton" if device.type == "cuda" and triton_available(device) else "eager"


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, fused: bool) -> torch.Tensor:
    """Rows ``x`` [M, K] sorted by group, ``w`` [G, K, N], ``offs`` [G] cumulative row ends -> [M, N]."""
    if fused:
        return torch._grouped_mm(x, w, offs=offs)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):  # reference path: host-synchronising, not graphable
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


class _Window:
    """Layers ``first .. first + count - 1`` of the stack, as grouped-GEMM operands (views, no copy)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, first: int, count: int) -> None:
        _, experts, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        self.first, self.count = first, count
        window_up = gate_up[first : first + count].reshape(count * experts, two_inter, hidden)
        window_down = down[first : first + count].reshape(count * experts, hidden, inter)
        self.w1 = window_up.transpose(1, 2)  # [G, H, 2I], reduction dim contiguous
        self.w2 = window_down.transpose(1, 2)  # [G, I, H]


class LayerAgnosticExperts:
    """One routine for every MoE layer over stacked weights; see the module docstring.

    ``gate_up`` [L, E, 2I, H] and ``down`` [L, E, H, I] (``nn.Linear`` layout) are viewed, without a copy,
    as per-window ``w1`` [G, H, 2I] and ``w2`` [G, I, H] with the reduction dimension contiguous, the
    layout the grouped GEMM takes.
    """

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        *,
        fused: bool | None = None,
        kernels: str | None = None,
        layers_per_window: int | None = None,
        large_tile_rows: int | None = None,
    ) -> None:
        """``fused``: grouped GEMMs (default where available) or the per-group loop; ``kernels``:
        ``eager`` or ``triton`` for the other steps (default: see the module docstring);
        ``layers_per_window``: at most this many layers per grouped GEMM (default: as many as fit);
        ``large_tile_rows``: from this many slots per expert of a layer on, the Triton path pads the GEMM
        operands so the grouped GEMM takes its large tile (see ``_gemm_rows``; default
        ``LARGE_TILE_ROWS``)."""
        layers, experts, two_inter, hidden = gate_up.shape
        self.layers, self.experts, self.hidden, self.inter = layers, experts, hidden, two_inter // 2
        self.layers_per_window = max(1, MAX_GROUPS // experts)
        if layers_per_window is not None:
            self.layers_per_window = max(1, min(self.layers_per_window, layers_per_window))
        self.windows = [
            _Window(gate_up, down, first, min(self.layers_per_window, layers - first))
            for first in range(0, layers, self.layers_per_window)
        ]
        self.device = gate_up.device
        self.fused = grouped_mm_available(self.device) if fused is None else fused
        self.kernels = _default_kernels(self.device) if kernels is None else kernels
        if self.kernels not in ("eager", "triton"):
            raise ValueError(f"kernels={self.kernels!r}: expected 'eager' or 'triton'")
        if self.kernels == "triton" and not triton_available(self.device):
            raise ValueError(f"the Triton kernels cannot run on {self.device} here (Triton missing?)")
        self.large_tile_rows = LARGE_TILE_ROWS if large_tile_rows is None else large_tile_rows
        self._group_ids_cache: dict[int, torch.Tensor] = {}

    def locate(self, slot: int) -> tuple[int, int]:
        """(window index, slot within the window) of stacked layer ``slot``."""
        return slot // self.layers_per_window, slot % self.layers_per_window

    def __call__(
        self, slot: int, hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """slot: stacked layer index; hidden [N, H]; local_ids [N, K] (-1 = skip); weights [N, K] float32
        -> [N, H] in the hidden dtype."""
        window, inner = self.locate(slot)
        inner_t = torch.full((), inner, dtype=torch.int64, device=hidden.device)
        return self.run_window(window, inner_t, hidden, local_ids, weights)

    def run_window(
        self,
        window: int,
        inner: torch.Tensor,
        hidden: torch.Tensor,
        local_ids: torch.Tensor,
        weights: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
        count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routine on one window; ``inner`` is the 0-d device tensor of the layer within it (data).
        With the Triton kernels only: ``out`` receives the results (returned), and with ``count`` (a
        1-element device tensor) only its rows below the count, the others left as they were."""
        w = self.windows[window]
        if self.kernels == "triton":
            return self._run_triton(w, inner, hidden, local_ids, weights, out, count)
        if out is not None or count is not None:
            raise ValueError("run_window: out and count need the Triton kernels")
        n, k = local_ids.shape
        groups = w.count * self.experts
        flat = local_ids.reshape(-1)  # [N*K]
        valid = flat >= 0
        # Skipped slots go to a trailing pseudo-group past the last offset: never computed.
        group = torch.where(valid, inner * self.experts + flat, torch.full_like(flat, groups))
        order = torch.argsort(group, stable=True)  # [N*K] slot of each sorted row
        counts = torch.zeros(groups + 1, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, group, torch.ones_like(group))  # fixed size: no host sync
        offs = counts[:groups].cumsum(0).to(torch.int32)  # [G]
        x = hidden.index_select(0, order // k)  # [N*K, H] token of each sorted row
        h1 = _grouped_linear(x, w.w1, offs, self.fused)  # [N*K, 2I]
        # The routing weight is folded in before the down projection (it is linear), on the narrow side,
        # in the model dtype (transformers also rounds routing weights to it).
        scale = torch.where(valid, weights.reshape(-1), 0.0).index_select(0, order).to(h1.dtype)  # [N*K]
        act = F.silu(h1[:, : self.inter]) * h1[:, self.inter :] * scale[:, None]  # [N*K, I]
        y = _grouped_linear(act, w.w2, offs, self.fused)  # [N*K, H]
        # Rows of skipped slots (past the last offset) were never written: zero them, never read garbage.
        y.masked_fill_((scale == 0)[:, None], 0.0)
        # Back to slot order with a gather (inverse permutation), then each token's K slots summed with
        # float32 accumulation.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        unsorted = y.index_select(0, inverse)  # [N*K, H]
        return unsorted.view(n, k, self.hidden).sum(dim=1, dtype=torch.float32).to(hidden.dtype)

    def _run_triton(
        self,
        w: _Window,
        inner: torch.Tensor,
        hidden: torch.Tensor,
        local_ids: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor | None = None,
        count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The routine with the Triton kernels. Rows past the valid count (the last offset, read on the
        device) are neither gathered, computed nor read; the routing weight is applied in float32 to each
        expert output as it is summed."""
        from asap.model import grouped_triton as kernels  # lazy: Triton is optional

        n, k = local_ids.shape
        groups = w.count * self.experts
        flat = local_ids.reshape(-1)
        # Group keys fit int16 (MAX_GROUPS < 2**15), so the radix sort makes 2 passes instead of 8; skipped
        # slots get the key ``groups``, past every real group. Offsets are found by binary search in the
        # sorted keys (no atomics): offs[g] = number of keys <= g.
        key = torch.where(flat >= 0, inner * self.experts + flat, groups).to(torch.int16)
        sorted_key, order = torch.sort(key, stable=True)
        offs = torch.searchsorted(sorted_key, self._group_ids(groups), right=True, out_int32=True)  # [G]
        count = offs[-1:]  # [1] valid sorted rows, on the device
        rows = self._gemm_rows(n * k, groups)
        x, inverse = kernels.gather_rows(hidden.contiguous(), order, count, k, rows=rows)
        h1 = _grouped_linear(x, w.w1, offs, self.fused)  # [rows, 2I], valid rows only
        act = kernels.silu_mul(h1, count, n * k)  # [rows, I]
        y = _grouped_linear(act, w.w2, offs, self.fused)  # [rows, H]
        return kernels.combine(y, local_ids.contiguous(), weights.contiguous(), inverse, out, count)

    def _group_ids(self, groups: int) -> torch.Tensor:
        ids = self._group_ids_cache.get(groups)
        if ids is None:
            ids = torch.arange(groups, dtype=torch.int16, device=self.device)
            self._group_ids_cache[groups] = ids
        return ids

    def _gemm_rows(self, slots: int, groups: int) -> int:
        """Rows allocated for the GEMM operands. ``torch._grouped_mm`` picks its tile from the static
        shape, rows / groups: at most 128 (always the case for a window of many layers, only one of which
        gets rows) selects a 64x128 tile, which reaches about half the tensor-core rate of the 128x256 one.
        When the layer's experts get ``large_tile_rows`` rows each on average (with every slot valid),
        the operands are padded past 128 rows per group: the extra rows are past the last offset, so they
        are never computed, read or written; they only cost memory (shared by all graphs)."""
        if not self.fused or slots < self.large_tile_rows * self.experts:
            return slots
        return max(slots, 129 * groups)


def bucket_for(rows: int) -> int:
    """The smallest bucket holding ``rows`` token rows (multiples of the largest bucket beyond it)."""
    for size in BUCKETS:
        if rows <= size:
            return size
    return -(-rows // BUCKETS[-1]) * BUCKETS[-1]


class GraphedExperts:
    """CUDA-graph replay of a ``LayerAgnosticExperts`` routine: one graph per token bucket (and window),
    serving any layer of the window.

    Inputs are copied into static buffers (padded rows carry id -1 and weight 0), the layer's index within
    its window into a 0-d device tensor, and the graph replays. Capture happens on first use. All graphs
    share one memory pool, so the intermediates of the largest bucket are allocated once, not once per
    graph. They replay one at a time on one stream, and a later capture may place its tensors where an
    earlier graph's intermediates were: the returned output is valid only until the next call, so callers
    copy it first (``ExpertPart`` clones it on the same stream).
    """

    def __init__(self, routine: LayerAgnosticExperts, top_k: int, dtype: torch.dtype) -> None:
        self.routine = routine
        self.top_k = top_k
        self.dtype = dtype
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self._pool: _POOL_HANDLE | None = None

    @property
    def captured(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def _capture(self, bucket: int, window: int) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        dev = self.routine.device
        static = {
            "inner": torch.zeros((), dtype=torch.int64, device=dev),
            "hidden": torch.zeros(bucket, self.routine.hidden, dtype=self.dtype, device=dev),
            "ids": torch.full((bucket, self.top_k), -1, dtype=torch.int64, device=dev),
            "weights": torch.zeros(bucket, self.top_k, dtype=torch.float32, device=dev),
        }

        def run() -> torch.Tensor:
            return self.routine.run_window(
                window, static["inner"], static["hidden"], static["ids"], static["weights"]
            )

        stream = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocations, kernel selection)
            for _ in range(2):
                run()
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            static["out"] = run()
        return graph, static

    def __call__(
        self, slot: int, hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        n = hidden.shape[0]
        bucket = bucket_for(n)
        window, inner = self.routine.locate(slot)
        key = (bucket, window)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bucket, window)
        graph, static = self._graphs[key]
        static["inner"].fill_(inner)
        static["hidden"][:n].copy_(hidden)
        static["ids"][:n].copy_(local_ids)
        static["ids"][n:].fill_(-1)
        static["weights"][:n].copy_(weights)
        static["weights"][n:].zero_()
        graph.replay()
        return static["out"][:n]
