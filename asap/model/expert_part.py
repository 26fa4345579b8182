"""The routed experts hosted by one expert rank, for every MoE layer at once.

Weights of all MoE layers are stacked (``gate_up`` [L_moe, E_local, 2I, H], ``down`` [L_moe, E_local, H, I])
so a single routine serves any layer: the layer is an index into the stack, not a different module. This is
the layer-agnostic execution of the design — the next layer's work can arrive in any order from any
attention rank and runs through the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from asap.errors import InvalidArgument
from asap.model import names
from asap.model.config import ModelConfig
from asap.model.fp8 import dequantizing
from asap.model.grouped import BUCKETS, GraphedExperts, LayerAgnosticExperts, bucket_for, grouped_mm_available
from asap.model.hosted import HostedCounts
from asap.model.layers import load_tensor
from asap.model.weights import TensorSource


class ExpertPart:
    """Routed experts ``hosted`` (sorted global ids) of all MoE layers, weights stacked per layer."""

    def __init__(
        self,
        config: ModelConfig,
        hosted: Sequence[int],
        *,
        gate_up: torch.Tensor,
        down: torch.Tensor,
    ) -> None:
        hosted_ids = _check_expert_ids(config, hosted)
        n_moe, n_local = len(config.moe_layer_ids), len(hosted_ids)
        h, i = config.hidden_size, config.expert_intermediate_size
        if gate_up.shape != (n_moe, n_local, 2 * i, h) or down.shape != (n_moe, n_local, h, i):
            raise InvalidArgument(
                f"stacked expert weights have shapes {tuple(gate_up.shape)} and {tuple(down.shape)}, "
                f"expected {(n_moe, n_local, 2 * i, h)} and {(n_moe, n_local, h, i)}"
            )
        self.config = config
        self.hosted = hosted_ids
        self.dtype = gate_up.dtype
        self.device = gate_up.device
        self.gate_up = gate_up  # [L_moe, E_local, 2I, H]
        self.down = down  # [L_moe, E_local, H, I]
        self.layer_agnostic = True
        """One routine over the stacked weights serves any layer (the layer index is data; on CUDA a
        graph per token bucket is replayed). Off: each call goes through that layer's own module."""
        self._per_layer: list[_LayerExperts] | None = None
        self._grouped: LayerAgnosticExperts | None = None
        self._graphed: GraphedExperts | None = None
        self._device_lut: torch.Tensor | None = None
        # torch._grouped_mm takes bf16 operands only: float32/float16 on CUDA use the per-expert loop
        self._grouped_gemm = grouped_mm_available(self.device) and self.dtype == torch.bfloat16
        # decoder layer -> index into the stack (-1: dense layer)
        self._slot_of_layer = [-1] * config.num_layers
        for slot, layer in enumerate(config.moe_layer_ids):
            self._slot_of_layer[layer] = slot
        # global expert id -> local index (-1: hosted elsewhere); kept on CPU for validation
        self._local_of_expert = torch.full((config.num_experts,), -1, dtype=torch.int64)
        self._local_of_expert[list(hosted_ids)] = torch.arange(n_local)

    @classmethod
    def from_source(
        cls,
        source: TensorSource,
        config: ModelConfig,
        expert_ids: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> ExpertPart:
        """Read only the tensors of ``expert_ids`` (every MoE layer) from ``source`` and stack them."""
        hosted = _check_expert_ids(config, expert_ids)
        dev = torch.device(device)
        source = dequantizing(source, config)
        h, i = config.hidden_size, config.expert_intermediate_size
        n_moe = len(config.moe_layer_ids)
        gate_up = torch.empty((n_moe, len(hosted), 2 * i, h), dtype=dtype, device=dev)
        down = torch.empty((n_moe, len(hosted), h, i), dtype=dtype, device=dev)
        for slot, layer in enumerate(config.moe_layer_ids):
            for local, expert_id in enumerate(hosted):
                n = names.expert(config, layer, expert_id)
                gate_up[slot, local, :i] = load_tensor(source, n.gate, (i, h), dtype=dtype, device=dev)
                gate_up[slot, local, i:] = load_tensor(source, n.up, (i, h), dtype=dtype, device=dev)
                down[slot, local] = load_tensor(source, n.down, (h, i), dtype=dtype, device=dev)
        return cls(config, hosted, gate_up=gate_up, down=down)

    def compute(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of the hosted experts' outputs per token.

        hidden [N, H]; expert_ids [N, K] global ids (-1: slot served by another part, skipped);
        weights [N, K] float32 -> [N, H] in the model dtype: for each token, the sum over its valid slots
        of ``weight * down(silu(gate x) * up x)``. Each expert output is scaled in float32 and cast to the
        model dtype before being accumulated with ``index_add_`` in ascending expert order, as
        ``transformers`` does. Raises ``InvalidArgument`` for a non-MoE layer, an id that is not hosted
        here, or inconsistent shapes.
        """
        local = self._local_ids(hidden, expert_ids, weights)  # [N, K] local index, -1 to skip
        return self.compute_local(layer, hidden, local, weights)

    def compute_counted(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        counted: HostedCounts,
    ) -> torch.Tensor:
        """``compute`` of ids the rank already checked, with their rows per hosted expert (``counted``,
        ``ExpertExecutor.check``). This part maps the ids to its own slots anyway and checks them on
        the way (``compute``); the emulated part, whose modelled time needs only the counts, does not
        check the same ids twice."""
        return self.compute(layer, hidden, expert_ids, weights)

    def compute_into(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``compute`` with the results written into ``out`` ([N, H], the model dtype, this part's
        device), which is returned: a caller that sends them from registered memory (the NIXL lane)
        neither copies them nor faults in a fresh [N, H] tensor per call (22-25 ms at 8k rows here).
        Same values as ``compute``. A subclass computing its own way (``compute`` overridden: the
        emulated part's modelled time and meta result) is called as it is, ``out`` left alone."""
        if type(self).compute is not ExpertPart.compute:
            return self.compute(layer, hidden, expert_ids, weights)
        local = self._local_ids(hidden, expert_ids, weights)  # [N, K] local index, -1 to skip
        if out.shape != hidden.shape or out.dtype != self.dtype or out.device != self.device:
            raise InvalidArgument(
                f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected "
                f"{tuple(hidden.shape)} {self.dtype} on {self.device}"
            )
        return self.compute_local(layer, hidden, local, weights, out=out)

    def compute_local(
        self,
        layer: int,
        hidden: torch.Tensor,
        local: torch.Tensor,
        weights: torch.Tensor,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``compute`` with the ids already translated to this part's local indices ([N, K], -1 to skip,
        on the device; ``device_local_ids``), so nothing waits for the device: the GPU fast plane's path.
        The caller guarantees the shapes (and those of ``out``, as ``compute`` takes it)."""
        slot = self._slot(layer)
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        weights = weights.to(device=self.device, dtype=torch.float32)
        if self._grouped_gemm:
            result = self._compute_grouped(slot, hidden, local, weights)
            return result if out is None else out.copy_(result)
        if not self.layer_agnostic:
            if self._per_layer is None:
                self._per_layer = [
                    _LayerExperts(self.gate_up[i], self.down[i]) for i in range(self.gate_up.shape[0])
                ]
            return self._per_layer[slot](hidden, local, weights, out)
        return _experts_loop(self.gate_up[slot], self.down[slot], hidden, local, weights, out)

    def prepare(self, max_rows: int) -> int:
        """Capture now the CUDA graph of every token bucket up to ``max_rows`` for every window of layers,
        so the first large batches after start-up pay no capture; returns the graphs captured. Call it on
        the thread (stream) that will compute. A no-op without graphs (CPU, or not layer-agnostic)."""
        if not (self._grouped_gemm and self.layer_agnostic):
            return 0
        h, k = self.config.hidden_size, self.config.top_k
        largest = bucket_for(max_rows)
        per_window = self._graphed_routine().routine.layers_per_window
        for slot in range(0, len(self.config.moe_layer_ids), per_window):
            layer = self.config.moe_layer_ids[slot]
            for bucket in (b for b in BUCKETS if b <= largest):
                ids = torch.full((bucket, k), -1, dtype=torch.int32)
                ids[:, 0] = self.hosted[0]
                weights = torch.zeros(bucket, k, dtype=torch.float32)
                self.compute(
                    layer, torch.zeros(bucket, h, dtype=self.dtype, device=self.device), ids, weights
                )
        return self._graphed.captured if self._graphed is not None else 0

    def _compute_grouped(
        self, slot: int, hidden: torch.Tensor, local: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """CUDA: the grouped-GEMM routine, graphed per token bucket when layer-agnostic, else per layer."""
        if self.layer_agnostic:
            return self._graphed_routine()(slot, hidden, local, weights).clone()
        per_layer = LayerAgnosticExperts(self.gate_up[slot : slot + 1], self.down[slot : slot + 1])
        return per_layer(0, hidden, local, weights)

    def _graphed_routine(self) -> GraphedExperts:
        if self._graphed is None:
            self._grouped = LayerAgnosticExperts(self.gate_up, self.down)
            self._graphed = GraphedExperts(self._grouped, self.config.top_k, self.dtype)
        return self._graphed

    def _slot(self, layer: int) -> int:
        if not 0 <= layer < self.config.num_layers or self._slot_of_layer[layer] < 0:
            raise InvalidArgument(
                f"layer {layer} is not an MoE layer (MoE layers: {list(self.config.moe_layer_ids)})"
            )
        return self._slot_of_layer[layer]

    def device_local_ids(self, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, K] global ids on the device -> (local indices, -1 to skip; [N, K] bool: ids that are neither
        -1 nor hosted here, which are skipped too), without a host synchronisation. The host-side check of
        ``compute`` raises for such ids instead; here the caller reads the mask when it can afford to."""
        e = self.config.num_experts
        local = self.device_lut()[(expert_ids.to(torch.int64) + 1).clamp_(-1, e + 1)]
        bad = local == -2
        return local.masked_fill_(bad, -1), bad

    def device_lut(self) -> torch.Tensor:
        """The id lookup of ``device_local_ids`` (int64 [E + 3], on the device): index 0 for id -1 (another
        rank's slot), 1 + e for expert e, E + 1 for an id >= E, E + 2 (reached as index -1, which wraps)
        for an id < -1; the local index, -1 for id -1, -2 for the ids not hosted here."""
        if self._device_lut is None:
            e = self.config.num_experts
            lut = torch.full((e + 3,), -2, dtype=torch.int64)
            lut[0] = -1
            lut[1 : e + 1] = torch.where(self._local_of_expert >= 0, self._local_of_expert, -2)
            self._device_lut = lut.to(self.device)
        return self._device_lut

    def _check_shapes(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """The shape and dtype rules of ``compute``'s inputs (the emulated part checks by them too)."""
        h = self.config.hidden_size
        if hidden.ndim != 2 or hidden.shape[1] != h:
            raise InvalidArgument(f"hidden has shape {tuple(hidden.shape)}, expected [N, {h}]")
        n = hidden.shape[0]
        if expert_ids.ndim != 2 or expert_ids.shape[0] != n or weights.shape != expert_ids.shape:
            raise InvalidArgument(
                f"expert_ids {tuple(expert_ids.shape)} and weights {tuple(weights.shape)} "
                f"must both be [{n}, K]"
            )
        if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
            raise InvalidArgument(f"expert_ids must be integers, got dtype {expert_ids.dtype}")

    def _local_ids(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        self._check_shapes(hidden, expert_ids, weights)
        ids = expert_ids.to(device="cpu", dtype=torch.int64)
        bad = (ids < -1) | (ids >= self.config.num_experts)
        valid = ids >= 0
        local = torch.where(valid, self._local_of_expert[ids.clamp(0, self.config.num_experts - 1)], -1)
        bad |= valid & (local < 0)
        if bool(bad.any()):
            wrong = sorted({int(x) for x in ids[bad].tolist()})
            raise InvalidArgument(f"expert ids {wrong} are not hosted here (hosted: {list(self.hosted)})")
        return local.to(self.device)


def _check_expert_ids(config: ModelConfig, expert_ids: Sequence[int]) -> tuple[int, ...]:
    ids = [int(e) for e in expert_ids]
    if not ids:
        raise InvalidArgument("an expert part needs at least one expert")
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"duplicate expert ids in {ids}")
    outside = [e for e in ids if not 0 <= e < config.num_experts]
    if outside:
        raise InvalidArgument(f"expert ids {outside} are outside [0, {config.num_experts})")
    return tuple(sorted(ids))


def _experts_loop(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    hidden: torch.Tensor,
    local: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's experts, looping over the experts present: gate_up [E, 2I, H], down [E, H, I];
    accumulated into ``out`` (zeroed first) when given, else into a new tensor."""
    out = torch.zeros_like(hidden) if out is None else out.zero_()  # [N, H]
    present = torch.unique(local[local >= 0]).tolist()  # sorted local = ascending global ids
    inter = down.shape[-1]
    for e in present:
        k_pos, rows = torch.where(e == local.T)  # slot-major order, like transformers' expert mask
        x = hidden[rows]  # [n, H]
        gate_up_out = F.linear(x, gate_up[e])  # [n, 2I]
        y = F.linear(F.silu(gate_up_out[:, :inter]) * gate_up_out[:, inter:], down[e])  # [n, H]
        y = y * weights[rows, k_pos, None]  # float32
        out.index_add_(0, rows, y.to(hidden.dtype))
    return out


class _LayerExperts:
    """The experts of one layer as their own module (what ``layer_agnostic = False`` calls per layer)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up = gate_up  # [E, 2I, H], a view of the stack (no copy)
        self.down = down  # [E, H, I]

    def __call__(
        self, hidden: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None
    ) -> torch.Tensor:
        return _experts_loop(self.gate_up, self.down, hidden, local, weights, out)
