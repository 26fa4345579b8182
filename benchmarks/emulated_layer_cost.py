"""Per-layer cost of the emulated cluster, undilated, by data plane: what a layer costs beyond the
modelled device time.

Starts real service processes on this host (expert ranks, attention ranks, a scheduler) with
``--compute emulated:h200`` (no dilation), a 16-layer Qwen3-30B-A3B-shaped model
(``benchmarks/models/qwen3-30b-a3b-16l``), for each data plane and each (attention, expert) shape in
turn; min-batch off, so nothing holds a request at the scheduler. Sends 128-token prompts one at a time
(low load) and takes the client-side TTFT. The modelled device time of the same prompt (attention
layers, LM head, and per layer the slowest expert rank's call for uniformly random routing) is
subtracted; the rest divided by the layer count is the per-layer cost of everything that is not the
modelled device: host control path, messaging, scheduling.

    python benchmarks/emulated_layer_cost.py --planes grpc,fast --shapes 1x1,4x4 --json OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from asap.bench.modeled import slowest_expert_call_s
from asap.client import AsapClient
from asap.emulation import DeviceProfile, EmulatedAttentionPart, parse_compute
from asap.emulation.costs import transfer_s
from asap.model.config import ModelConfig, load_config
from asap.model.placement import ExpertPlacement
from tests.procs import ServiceProcess

MODEL = Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b-16l"
OPTIMIZATIONS = "dual-batch,expert-overlap,layer-agnostic"  # min-batch off: no hold at the scheduler


def modeled_ms(model: Path, compute: str, experts: int, tokens: int, samples: int = 20) -> float:
    """Modelled device time (ms) of one prompt: attention + LM head + per MoE layer the slowest expert
    and the emulated links' transfers (``link_transfer_s``)."""
    config = load_config(model)
    profile = parse_compute(compute)[1]
    assert profile is not None
    attention = EmulatedAttentionPart(config, profile)
    per_layer = slowest_expert_call_s(config, profile, experts, tokens, samples=samples)
    per_layer += link_transfer_s(config, profile, experts, tokens, samples=samples)
    return (attention.modeled_s([tokens]) + per_layer * len(config.moe_layer_ids)) * 1e3


def link_transfer_s(
    config: ModelConfig, profile: DeviceProfile, experts: int, tokens: int, *, samples: int = 20
) -> float:
    """Seconds one MoE layer's rows spend on the emulated links, as the fast plane charges them: the
    dispatch (hidden rows plus their ids and weights, ``top_k * 8`` bytes a row) before the expert may
    take it, the result after it answered; for the rank with the most rows (each token's rows go once
    to every rank hosting one of its experts), the mean over ``samples`` random routings. ~1.2 µs each
    way for 128 tokens of a 2048-wide bf16 model on ``h200``."""
    placement = ExpertPlacement(config.num_experts, experts)
    rank_of = torch.tensor([placement.rank_of(e) for e in range(config.num_experts)])
    row_bytes = config.hidden_size * 2  # bf16, as the benchmark runs the ranks
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(samples):
        ids = torch.stack(
            [torch.randperm(config.num_experts, generator=g)[: config.top_k] for _ in range(tokens)]
        )
        ranks = rank_of[ids]  # [T, K]
        rows = max(int((ranks == r).any(dim=1).sum()) for r in range(experts))
        total += transfer_s(rows * (row_bytes + config.top_k * 8), profile) + transfer_s(
            rows * row_bytes, profile
        )
    return total / samples


def _start(
    plane: str,
    attention: int,
    experts: int,
    compute: str,
    model: Path = MODEL,
    run: Sequence[str] = ("-m",),
) -> list[ServiceProcess]:
    """The cluster's processes, the scheduler last; ``run`` is what precedes each service's module name
    on the interpreter's command line (``request_breakdown.py`` runs them through a wrapper)."""
    common = ["--model", str(model), "--port", "0", "--compute", compute, "--dtype", "bfloat16",
              "--optimizations", OPTIMIZATIONS]  # fmt: skip
    procs = []
    try:
        ranks = [
            ServiceProcess(
                f"expert-{r}",
                [
                    *run,
                    "expert_svc",
                    *common,
                    "--rank",
                    str(r),
                    "--num-ranks",
                    str(experts),
                    "--data-plane",
                    plane,
                ],
            )
            for r in range(experts)
        ]
        procs += ranks
        targets = ",".join(p.wait_ready() for p in ranks)
        tops = [
            ServiceProcess(
                f"attention-{r}",
                [
                    *run,
                    "attention_svc",
                    *common,
                    "--rank",
                    str(r),
                    "--experts",
                    targets,
                    "--data-plane",
                    plane,
                ],
            )
            for r in range(attention)
        ]
        procs += tops
        heads = ",".join(p.wait_ready() for p in tops)
        scheduler = ServiceProcess(
            "scheduler", [*run, "scheduler_svc", "--port", "0", "--attention", heads, "--model", str(model),
                          "--optimizations", OPTIMIZATIONS])  # fmt: skip
        procs.append(scheduler)
        scheduler.wait_ready()
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


async def _ttfts(target: str, tokens: int, warmup: int, requests: int, vocab: int) -> list[float]:
    g = torch.Generator().manual_seed(1)
    out = []
    async with AsapClient(target) as client:
        for i in range(warmup + requests):
            prompt = torch.randint(0, vocab, (tokens,), generator=g).tolist()
            start = time.perf_counter()
            await client.prefill(tokens=prompt)
            if i >= warmup:
                out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--planes", default="grpc,fast")
    parser.add_argument("--shapes", default="1x1,4x4", help="ATTENTIONxEXPERTS, comma-separated")
    parser.add_argument("--compute", default="emulated:h200")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument(
        "--model",
        type=Path,
        default=MODEL,
        help="model directory (default the 16-layer one; benchmarks/models/qwen3-30b-a3b-8l with it "
        "separates what a request costs once from what each layer costs)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    model: Path = args.model
    config = load_config(model)
    layers = config.num_layers
    results: dict[str, object] = {"model": str(model), "compute": args.compute, "tokens": args.tokens,
                                  "layers": layers, "requests": args.requests, "runs": []}  # fmt: skip
    runs: list[dict[str, object]] = []
    for shape in args.shapes.split(","):
        attention, experts = (int(x) for x in shape.split("x"))
        modeled = modeled_ms(model, args.compute, experts, args.tokens)
        for plane in args.planes.split(","):
            procs = _start(plane, attention, experts, args.compute, model)
            try:
                target = procs[-1].address
                ttfts = asyncio.run(
                    _ttfts(target, args.tokens, args.warmup, args.requests, config.vocab_size)
                )
            finally:
                for p in procs:
                    p.stop()
            p50 = statistics.median(ttfts)
            run = {
                "shape": shape,
                "plane": plane,
                "ttft_ms_p50": p50,
                "ttft_ms_mean": statistics.mean(ttfts),
                "ttft_ms_p10": sorted(ttfts)[len(ttfts) // 10],
                "modeled_ms": modeled,
                "per_layer_overhead_ms": (p50 - modeled) / layers,
                "load_average": os.getloadavg(),
            }
            runs.append(run)
            print(
                f"{shape:5s} {plane:5s} TTFT p50 {p50:7.2f} ms  modeled {modeled:6.2f} ms  "
                f"per-layer cost beyond the model {run['per_layer_overhead_ms']:.3f} ms  "
                f"({layers} layers, load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    results["runs"] = runs
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
