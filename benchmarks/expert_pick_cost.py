"""The expert side's host work from a descriptor in the ring to the start of its computation, in process.

An attention link end and an emulated expert rank's ``FastLane`` share one region in this process; each
iteration fills and publishes one 128-row shape-only dispatch, then runs what the expert's poll thread runs
(``ExpertLinkEnd.poll``: take, descriptor and header checks, id validation, the item; the lane's flush)
with the computation itself replaced by an immediate answer. No thread wakes are measured: this is the
Python work of "picked -> compute start" in ``benchmarks/layer_hops.py``.

    python benchmarks/expert_pick_cost.py [--iters 2000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asap.dataplane.fast_attention import AttentionLinkEnd
from asap.dataplane.fastlink import LinkGeometry
from asap.emulation import EmulatedExpertPart
from asap.emulation.clock import Sleeper
from asap.emulation.profiles import load_profile
from asap.model.config import load_config
from expert_svc.core import ExpertExecutor
from expert_svc.fastlane import FastLane

MODEL = Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b-16l"


class _NoPoller:
    def add(self, endpoint: object) -> None:
        pass

    def remove(self, endpoint: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the measured path")
    args = parser.parse_args()
    config = load_config(MODEL)
    loop = asyncio.new_event_loop()
    part = EmulatedExpertPart(
        config, list(range(config.num_experts)), load_profile("h200"), sleeper=Sleeper(bias_s=0.0)
    )
    lane = FastLane(ExpertExecutor(part), shape_only=True)
    lane.poller = _NoPoller()  # type: ignore[assignment]
    geometry = LinkGeometry(4, 1 << 20, config.hidden_size, config.top_k, 2)
    end = AttentionLinkEnd(
        geometry,
        attention_rank=0,
        expert_rank=0,
        dtype=torch.bfloat16,
        peer="expert",
        peer_timeout_s=5.0,
        loop=loop,
        poller=_NoPoller(),  # type: ignore[arg-type]
    )
    expert_end = lane.attach(end.announcement().fast_link)
    ids = torch.randint(0, config.num_experts, (args.rows, config.top_k), dtype=torch.int32)
    weights = torch.rand(args.rows, config.top_k)
    layer = config.moe_layer_ids[0]
    starts: list[int] = []

    def answer_at_once(self: FastLane, group: list[Any]) -> None:
        starts.append(time.monotonic_ns())
        for item in group:
            item.end.answer(item.request, None)
            item.end.release()

    FastLane._compute = answer_at_once  # type: ignore[method-assign]

    def one(profile: cProfile.Profile | None = None) -> float:
        header = end.header(0, layer, args.rows, "", "", 0)
        end.fill(0, header, None, ids, weights)
        end.publish(0, 0, layer, args.rows, shape_only=True, link_s=0.0)
        taken = time.monotonic_ns()
        if profile is not None:
            profile.enable()
        expert_end.poll(taken)
        lane._flush()
        if profile is not None:
            profile.disable()
        end.completions.pop()
        end._pending.clear()
        end._release(0)
        return (starts[-1] - taken) / 1e3

    for _ in range(200):
        one()
    values = sorted(one() for _ in range(args.iters))
    print(
        f"descriptor -> compute start ({args.rows} rows, shape-only): median {statistics.median(values):.1f} µs, "
        f"p10 {values[len(values) // 10]:.1f}, p90 {values[len(values) * 9 // 10]:.1f}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if args.profile:
        profile = cProfile.Profile()
        for _ in range(args.iters):
            one(profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    lane.detach(expert_end)
    end.close()
    loop.close()


if __name__ == "__main__":
    main()
