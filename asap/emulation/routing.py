"""Random top-k routing for emulated compute (``RandomRouter``): real expert ids, drawn from a Zipf-like
popularity over the experts (``skew`` = 0: uniform), each MoE layer with its own hot set (``hot_sets``),
the same for every attention rank of a model.
"""

from __future__ import annotations

import torch

from asap.errors import InvalidArgument
from asap.model.config import ModelConfig

__all__ = ["HOT_SET_SEED", "RandomRouter", "hot_sets"]

HOT_SET_SEED = 0x5EED
"""Seeds the per-layer hot sets of skewed routing (``hot_sets``): one draw for the model, every rank."""


def hot_sets(config: ModelConfig) -> dict[int, torch.Tensor]:
    """Each MoE layer's experts in popularity order ([E] global ids, the most popular first): the same
    for every router of ``config``'s model, a different order per layer."""
    g = torch.Generator().manual_seed(HOT_SET_SEED)
    return {layer: torch.randperm(config.num_experts, generator=g) for layer in config.moe_layer_ids}


class RandomRouter:
    """Random top-k routing, deterministic per (seed, call, layer).

    Drawing K of E experts without replacement for every token is slow on a CPU (~50 ms per layer at 16k
    tokens), so a pool of ``pool_rows`` routed rows (ids in popularity-rank space, weights normalised to
    one) is drawn once; each token of a call takes a random pool row, mapped through the layer's own
    permutation of expert ids. Popularity of rank r is proportional to (r + 1) ** -skew; with skew > 0
    that permutation (the layer's hot set) is the model's (``hot_sets``), shared by every router.
    """

    def __init__(self, config: ModelConfig, *, seed: int, skew: float, pool_rows: int = 4096) -> None:
        if skew < 0:
            raise InvalidArgument(f"routing skew must be >= 0, got {skew}")
        if pool_rows <= 0:
            raise InvalidArgument(f"pool_rows must be positive, got {pool_rows}")
        self.seed, self.skew = seed, skew
        e, k = config.num_experts, config.top_k
        g = torch.Generator().manual_seed(seed)
        popularity = torch.arange(1, e + 1, dtype=torch.float64).pow(-skew)  # [E] by rank
        # Exponential race: the k smallest Exp(1) / p_e are a draw of k distinct experts weighted by p.
        keys = torch.empty((pool_rows, e), dtype=torch.float64).exponential_(generator=g) / popularity
        self._pool_ids = keys.topk(k, dim=1, largest=False).indices  # [P, K] ranks
        w = torch.rand((pool_rows, k), generator=g, dtype=torch.float32) + 1e-3
        self._pool_weights = w / w.sum(dim=1, keepdim=True)  # [P, K]
        # layer -> [E] global id of each popularity rank. With skew, the hot experts of a layer are the
        # model's, the same for every router (attention rank): a real gate's popular experts come from
        # its weights and the data, and an expert rank's load sums every attention rank's tokens, so
        # hot sets drawn per rank would average out over the ranks. Without skew the permutation only
        # relabels a uniform draw; each router keeps its own (the draws of earlier trees, unchanged).
        self._expert_of_rank = (
            hot_sets(config)
            if skew
            else {layer: torch.randperm(e, generator=g) for layer in config.moe_layer_ids}
        )
        # The pool mapped through each layer's permutation once (P * K int64 per MoE layer, 256 KiB at
        # 4096 x 8), in numpy: a call then takes its rows with one ``take`` per tensor. Two torch gathers
        # per layer cost ~100-180 µs of the attention compute thread's CPU on a loaded host, against
        # ~40-60 µs for the draw and the takes; the values are the same.
        self._layer_pool_ids = {
            layer: perm[self._pool_ids].numpy() for layer, perm in self._expert_of_rank.items()
        }  # layer -> [P, K] global expert ids
        self._pool_weights_np = self._pool_weights.numpy()  # [P, K]

    def route(self, layer: int, tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [T, K] int64 (distinct per row) and weights [T, K] float32 for one layer of a call."""
        rows = torch.randint(self._pool_ids.shape[0], (tokens,), generator=g).numpy()  # [T]
        ids = self._layer_pool_ids[layer].take(rows, axis=0)
        return torch.from_numpy(ids), torch.from_numpy(self._pool_weights_np.take(rows, axis=0))
