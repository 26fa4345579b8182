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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, *, fused: bool | None = None) -> None:
        layers, experts, two_inter, hidden = gate_up.shape
        self.layers, self.experts, self.hidden, self.inter = layers, experts, hidden, two_inter // 2
        self.layers_per_window = max(1, MAX_GROUPS // experts)
        self.windows = [
            _Window(gate_up, down, first, min(self.layers_per_window, layers - first))
            for first in range(0, layers, self.layers_per_window)
        ]
        self.device = gate_up.device
        self.fused = grouped_mm_available(self.device) if fused is None else fused

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
    ) -> torch.Tensor:
        """The routine on one window; ``inner`` is the 0-d device tensor of the layer within it (data)."""
        w = self.windows[window]
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
    its window into a 0-d device tensor, and the graph replays. Capture happens on first use.
    """

    def __init__(self, routine: LayerAgnosticExperts, top_k: int, dtype: torch.dtype) -> None:
        self.routine = routine
        self.top_k = top_k
        self.dtype = dtype
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}

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
        with torch.cuda.graph(graph):
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
