"""Expert routine on a GPU, the eager and the Triton kernels side by side: correctness against a float32
per-expert loop, and the knee (ms and TFLOP/s vs tokens) of one graph replay per call.
Qwen3-30B-A3B-shaped experts (hidden 2048, intermediate 768, top-8 of 128), 48 MoE layers, for a shard of
64 experts (2 expert ranks: about half of each token's slots are routed to the other rank, id -1) and for
all 128 experts on one rank. Only valid (token, expert) pairs count as FLOPs, 2 * 3 * H * I each.

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
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asap.model.grouped import GraphedExperts, LayerAgnosticExperts, triton_available

H, I, K, GLOBAL_EXPERTS = 2048, 768, 8, 128
TOKENS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def cuda_time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median of per-iteration CUDA-event times (ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_per_call_us(calls: list[Callable[[], object]], repeats: int = 3) -> float:
    """Host wall time per call over a sequence of calls (launch-bound regime), median of repeats."""
    results = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for call in calls:
            call()
        torch.cuda.synchronize()
        results.append((time.perf_counter() - t0) / len(calls) * 1e6)
    return statistics.median(results)


def inputs(tokens: int, hosted: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens routed to K distinct experts of all 128; those past ``hosted`` are on another rank (-1)."""
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
    ids = torch.rand(tokens, GLOBAL_EXPERTS, device="cuda", generator=gen).argsort(dim=1)[:, :K]
    w = torch.rand(tokens, K, device="cuda", generator=gen)
    w = w / w.sum(1, keepdim=True)
    return x, torch.where(ids < hosted, ids, -1), w


def reference(
    gate_up: torch.Tensor, down: torch.Tensor, slot: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """float32 per-expert loop."""
    out = torch.zeros(x.shape[0], H, device=x.device)
    xf = x.float()
    for e in torch.unique(ids[ids >= 0]).tolist():
        rows, kpos = torch.where(ids == e)
        h = xf[rows] @ gate_up[slot, e].float().T
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, rows, (a @ down[slot, e].float().T) * w[rows, kpos, None])
    return out


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def bench_shard(
    label: str, layers: int, hosted: int, kernels: list[str], gen: torch.Generator
) -> dict[str, object]:
    gate_up = torch.empty(layers, hosted, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    down = torch.empty(layers, hosted, H, I, device="cuda", dtype=torch.bfloat16)
    gate_up.normal_(0.0, 0.02, generator=gen)
    down.normal_(0.0, 0.02, generator=gen)
    routines = {kind: LayerAgnosticExperts(gate_up, down, kernels=kind) for kind in kernels}
    graphed = {kind: GraphedExperts(r, K, torch.bfloat16) for kind, r in routines.items()}
    out: dict[str, object] = {
        "layers": layers,
        "experts_hosted": hosted,
        "windows": len(routines[kernels[0]].windows),
        "groups_per_window": routines[kernels[0]].layers_per_window * hosted,
    }

    # Correctness: first and last stacked layer (different windows), eager call and graph replay.
    x, ids, w = inputs(512, hosted, gen)
    errors: dict[str, float] = {}
    for kind in kernels:
        errs = []
        for slot in (0, layers - 1):
            ref = reference(gate_up, down, slot, x, ids, w)
            errs.append(rel_error(routines[kind](slot, x, ids, w), ref))
            errs.append(rel_error(graphed[kind](slot, x, ids, w), ref))
        errors[kind] = max(errs)
    out["rel_error_vs_fp32"] = errors

    curve: dict[int, dict[str, object]] = {}
    slot = layers // 2
    for tokens in TOKENS:
        x, ids, w = inputs(tokens, hosted, gen)
        pairs = int((ids >= 0).sum())
        flops = pairs * 2 * 3 * H * I
        ref = reference(gate_up, down, slot, x, ids, w)
        point: dict[str, object] = {"valid_pairs": pairs}
        for kind in kernels:
            err = rel_error(graphed[kind](slot, x, ids, w), ref)
            ms = cuda_time_ms(functools.partial(graphed[kind], slot, x, ids, w), 15)
            point[kind] = {"graph_ms": ms, "tflops": flops / ms / 1e9, "rel_error_vs_fp32": err}
        if "eager" in kernels and "triton" in kernels:
            point["speedup"] = point["eager"]["graph_ms"] / point["triton"]["graph_ms"]  # type: ignore[index]
        curve[tokens] = point
        print(label, tokens, json.dumps(point), flush=True)
    out["curve"] = curve

    # Layer-agnostic replay: layers in a random order, so windows switch between calls.
    order = [random.Random(s).randrange(layers) for s in range(2 * layers)]
    replay: dict[int, dict[str, float]] = {}
    for tokens in (64, 1024):
        x, ids, w = inputs(tokens, hosted, gen)
        replay[tokens] = {
            kind: wall_per_call_us([functools.partial(graphed[kind], layer, x, ids, w) for layer in order])
            for kind in kernels
        }
    out["random_layer_replay_us_per_call"] = replay
    out["graphs_captured"] = {kind: g.captured for kind, g in graphed.items()}

    # Fixed cost at few tokens vs the layers per window (smaller windows: more graphs, fewer groups).
    if "triton" in kernels:
        sweep: dict[int, dict[int, float]] = {}
        for per_window in (1, 4, routines["triton"].layers_per_window):
            r = LayerAgnosticExperts(gate_up, down, kernels="triton", layers_per_window=per_window)
            g = GraphedExperts(r, K, torch.bfloat16)
            sweep[per_window * hosted] = {}
            for tokens in (128, 2048):
                x, ids, w = inputs(tokens, hosted, gen)
                sweep[per_window * hosted][tokens] = cuda_time_ms(functools.partial(g, slot, x, ids, w), 15)
            del g, r
        out["triton_graph_ms_by_groups_per_window"] = sweep
    del routines, graphed, gate_up, down
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--kernels", default=None, help="comma-separated subset of eager,triton (default: both if possible)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.kernels:
        kernels = args.kernels.split(",")
    else:
        kernels = ["eager", "triton"] if triton_available(torch.device("cuda")) else ["eager"]
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "kernels": kernels,
        "shape": {"hidden": H, "intermediate": I, "top_k": K, "experts": GLOBAL_EXPERTS},
        "flops_counted": "valid (token, expert) pairs x 2*3*H*I",
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass

    # Dense bf16 peak on this card, the ceiling the expert routine is compared with.
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak_ms = cuda_time_ms(functools.partial(torch.matmul, a, b), 20)
    peak = 2 * 8192**3 / peak_ms / 1e9
    report["dense_bf16_tflops"] = peak
    del a, b

    started = time.perf_counter()
    results: dict[str, object] = {}
    for label, hosted in (("shard_64", 64), ("all_128", 128)):
        results[label] = bench_shard(label, args.layers, hosted, kernels, gen)
        for point in results[label]["curve"].values():  # type: ignore[attr-defined]
            for kind in kernels:
                point[kind]["fraction_of_peak"] = point[kind]["tflops"] / peak
    report["results"] = results
    report["seconds"] = time.perf_counter() - started
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
