"""How unbalanced the emulated routing is at a given ``--route-skew``: per MoE layer, each expert rank's
load (token-expert assignments it receives, the measure of SGLang's "GPU balancedness": mean load over
max load across the expert-parallel ranks) under the contiguous expert placement the services use.

    python benchmarks/route_balance.py --model benchmarks/models/deepseek-v3.2 --ranks 16,32 \
        --tokens 4096,16384 --skews 0,0.5,1,1.5 [--seeds 8] [--json OUT]

Prints, per (ranks, tokens, skew), the balancedness of one attention rank's dispatch and of the loads
summed over ``--seeds`` attention ranks (an expert rank's work in a DP+EP step of that many ranks), both
averaged over the MoE layers, and the busiest expert's share of all assignments. It draws through
``RandomRouter.route`` exactly as an emulated attention rank does (seed = attention rank).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from asap.emulation.routing import RandomRouter
from asap.model.config import load_config
from asap.model.placement import ExpertPlacement


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v]


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def balance(model: str, ranks: int, tokens: int, skew: float, seeds: int) -> dict[str, float]:
    """Balancedness of one router's dispatch (``per_router``) and of the loads summed over ``seeds``
    routers (``summed``: what each expert rank gets in a DP+EP step of that many attention ranks),
    averaged over the MoE layers."""
    config = load_config(model)
    placement = ExpertPlacement(config.num_experts, ranks)
    rank_of = np.empty(config.num_experts, dtype=np.int64)
    for r in range(ranks):
        rank_of[list(placement.experts_of(r))] = r
    layers = config.moe_layer_ids
    summed = {layer: np.zeros(ranks, dtype=np.int64) for layer in layers}
    per_router: list[float] = []
    top_share: list[float] = []
    for seed in range(seeds):
        router = RandomRouter(config, seed=seed, skew=skew)
        g = torch.Generator().manual_seed(1000 + seed)
        for layer in layers:
            ids, _ = router.route(layer, tokens, g)
            flat = ids.numpy().ravel()
            load = np.bincount(rank_of[flat], minlength=ranks)
            summed[layer] += load
            per_router.append(float(load.mean() / load.max()))
            top_share.append(float(np.bincount(flat, minlength=config.num_experts).max() / flat.size))
    step = [float(load.mean() / load.max()) for load in summed.values()]
    return {
        "ranks": ranks,
        "tokens": tokens,
        "skew": skew,
        "routers": seeds,
        "per_router": statistics.fmean(per_router),
        "summed": statistics.fmean(step),
        "summed_min": min(step),
        "summed_max": max(step),
        "hottest_expert_share": statistics.fmean(top_share),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="benchmarks/models/deepseek-v3.2")
    parser.add_argument("--ranks", type=_ints, default=[16, 32])
    parser.add_argument("--tokens", type=_ints, default=[4096, 16384])
    parser.add_argument("--skews", type=_floats, default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--seeds", type=int, default=8, help="routers (attention ranks) per point")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    rows = []
    print(
        "balancedness = mean / max load over the expert ranks, averaged over the MoE layers\n"
        "ranks  tokens  skew  one router  summed over routers (layer range)  hottest expert's share"
    )
    for ranks in args.ranks:
        for tokens in args.tokens:
            for skew in args.skews:
                row = balance(args.model, ranks, tokens, skew, args.seeds)
                rows.append(row)
                print(
                    f"{ranks:5d} {tokens:7d} {skew:5.2f}  {row['per_router']:10.3f}  "
                    f"{row['summed']:10.3f} ({row['summed_min']:.3f}-{row['summed_max']:.3f})  "
                    f"{row['hottest_expert_share']:18.2%}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "seeds": args.seeds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
