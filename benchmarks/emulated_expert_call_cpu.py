"""The host CPU of one emulated expert call, in process, with the modelled sleep taken out.

What an emulated expert rank's poll thread spends per MoE layer inside ``EmulatedExpertPart.compute``
besides sleeping: the id checks, the rows per expert and the modelled time of the call. One 128-token
layer of the 16-layer Qwen3-30B-A3B-shaped model routed by the emulated router, on a rank hosting every
expert (1 expert rank) and one hosting a quarter of them (4 ranks; other ranks' slots are -1). Thread CPU
time (``time.thread_time_ns``) over batches of calls; prints the median and the best batch.

    python benchmarks/emulated_expert_call_cpu.py [--calls 500] [--batches 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asap.emulation.clock import Sleeper
from asap.emulation.parts import EmulatedExpertPart
from asap.emulation.profiles import load_profile
from asap.emulation.routing import RandomRouter
from asap.model.config import load_config

MODEL = Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b-16l"


class _NoSleep(Sleeper):
    """Counts the requested time instead of sleeping it."""

    def __init__(self) -> None:
        super().__init__(bias_s=0.0)

    def sleep(self, seconds: float) -> None:
        self.requested_s += seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="calls per timed batch")
    parser.add_argument("--batches", type=int, default=7, help="timed batches per rank layout")
    args = parser.parse_args()
    config = load_config(MODEL)
    profile = load_profile("h200")
    router = RandomRouter(config, seed=0, skew=0.0)
    generator = torch.Generator().manual_seed(1)
    layer = config.moe_layer_ids[0]
    hidden = torch.empty((128, config.hidden_size), dtype=torch.bfloat16, device="meta")
    for ranks in (1, 4):
        hosted = list(range(config.num_experts // ranks))
        part = EmulatedExpertPart(config, hosted, profile, sleeper=_NoSleep())
        ids, weights = router.route(layer, 128, generator)
        ids = ids.to(torch.int32)  # what the fast plane's slots carry
        ids = torch.where(ids < len(hosted), ids, torch.full_like(ids, -1))
        per_call_us = []
        for _ in range(args.batches):
            started = time.thread_time_ns()
            for _ in range(args.calls):
                part.compute(layer, hidden, ids, weights)
            per_call_us.append((time.thread_time_ns() - started) / args.calls / 1e3)
        print(
            f"{ranks} expert rank(s), {len(hosted)} hosted experts: host CPU per call "
            f"median {statistics.median(per_call_us):.1f} µs, best {min(per_call_us):.1f} µs"
        )


if __name__ == "__main__":
    main()
