"""Expert routine on a GPU: correctness, the knee (TFLOP/s vs tokens), and layer-agnostic graph replay
against per-layer eager calls. Qwen3-30B-A3B-shaped experts (hidden 2048, intermediate 768, top-8).

Run on the device machine (see benchmarks/README.md):
    python3 benchmarks/gpu_experts.py --json $OUT/gpu_experts.json
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.model.grouped import GraphedExperts, LayerAgnosticExperts

H, I, K = 2048, 768, 8


def cuda_time_ms(fn: object, iters: int, warmup: int = 5) -> float:
    """Median of per-iteration CUDA-event times (ms)."""
    for _ in range(warmup):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_per_call_us(calls: list[object], repeats: int = 3) -> float:
    """Host wall time per call over a sequence of calls (launch-bound regime), median of repeats."""
    results = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for call in calls:
            call()  # type: ignore[operator]
        torch.cuda.synchronize()
        results.append((time.perf_counter() - t0) / len(calls) * 1e6)
    return statistics.median(results)


def inputs(
    tokens: int, experts: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = "cuda"
    x = torch.randn(tokens, H, device=dev, dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(tokens, experts, device=dev, generator=gen).argsort(dim=1)[:, :K]  # K distinct
    w = torch.rand(tokens, K, device=dev, generator=gen)
    return x, ids, w / w.sum(1, keepdim=True)


def reference(
    gate_up: torch.Tensor, down: torch.Tensor, slot: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """float32 per-expert loop."""
    out = torch.zeros(x.shape[0], H, device=x.device)
    xf = x.float()
    for e in torch.unique(ids).tolist():
        rows, kpos = torch.where(ids == e)
        h = xf[rows] @ gate_up[slot, e].float().T
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, rows, (a @ down[slot, e].float().T) * w[rows, kpos, None])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument(
        "--experts", type=int, default=32, help="experts on this rank (32 = 128 over 4 ranks)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    report: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    # Dense bf16 peak on this card, the ceiling the expert routine is compared with.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak_ms = cuda_time_ms(functools.partial(torch.matmul, a, b), 20)
    report["dense_bf16_tflops"] = 2 * 8192**3 / peak_ms / 1e9

    results: dict[str, object] = {}
    for label, layers, experts in (("all_128", 8, 128), (f"shard_{args.experts}", args.layers, args.experts)):
        gate_up = (
            torch.randn(layers, experts, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        )
        down = torch.randn(layers, experts, H, I, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        routine = LayerAgnosticExperts(gate_up, down)
        graphed = GraphedExperts(routine, K, torch.bfloat16)
        x, ids, w = inputs(512, experts, gen)
        errs = []
        for slot in (0, layers - 1):
            out = routine(slot, x, ids, w).float()
            ref = reference(gate_up, down, slot, x, ids, w)
            errs.append(float((out - ref).norm() / ref.norm()))
            g_out = graphed(slot, x, ids, w).float()
            errs.append(float((g_out - ref).norm() / ref.norm()))
        curve = {}
        for tokens in (128, 256, 512, 1024, 2048, 4096, 8192, 16384):
            x, ids, w = inputs(tokens, experts, gen)
            eager_ms = cuda_time_ms(functools.partial(routine, layers // 2, x, ids, w), 10)
            graph_ms = cuda_time_ms(functools.partial(graphed, layers // 2, x, ids, w), 10)
            flops = 2 * tokens * K * (H * 2 * I + I * H)  # every token's K rows land on this part
            curve[tokens] = {
                "eager_ms": eager_ms,
                "graph_ms": graph_ms,
                "graph_tflops": flops / graph_ms / 1e9,
            }
        results[label] = {"rel_error_vs_fp32": max(errs), "curve": curve}
        # Layer-agnostic replay vs per-layer eager calls, layers in a random order (the next layer is
        # unpredictable when chunks of many micro-batches interleave).
        overhead = {}
        per_layer = [LayerAgnosticExperts(gate_up[i : i + 1], down[i : i + 1]) for i in range(layers)]
        order = [random.Random(s).randrange(layers) for s in range(4 * layers)]
        for tokens in (64, 256, 1024):
            x, ids, w = inputs(tokens, experts, gen)
            agnostic: list[object] = [functools.partial(graphed, layer, x, ids, w) for layer in order]
            eager: list[object] = [functools.partial(per_layer[layer], 0, x, ids, w) for layer in order]
            overhead[tokens] = {
                "graph_replay_us_per_call": wall_per_call_us(agnostic),
                "per_layer_eager_us_per_call": wall_per_call_us(eager),
            }
        results[label]["layer_agnostic"] = overhead  # type: ignore[index]
        results[label]["graphs_captured"] = graphed.captured  # type: ignore[index]
        results[label]["windows"] = len(routine.windows)  # type: ignore[index]
        torch.cuda.empty_cache()
    report["results"] = results
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
