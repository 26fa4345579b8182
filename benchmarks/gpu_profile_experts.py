"""Kernel-level profile (torch.profiler) of one layer-agnostic expert call, eager vs Triton kernels side by
side (diagnostics for benchmarks/gpu_experts.py): a 64-expert shard of 48 layers (about half of the
slots routed to the other rank), 8192 tokens, and 128 tokens for the fixed cost.

Run on the device machine:
    python3 benchmarks/gpu_profile_experts.py --json $OUT/gpu_profile_experts.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asap.model.grouped import GraphedExperts, LayerAgnosticExperts, triton_available

H, I, K, GLOBAL_EXPERTS, HOSTED, LAYERS = 2048, 768, 8, 128, 64, 48


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--tokens", default="8192,128")
    args = parser.parse_args()
    kernels = ["eager", "triton"] if triton_available(torch.device("cuda")) else ["eager"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    gate_up = torch.empty(LAYERS, HOSTED, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    down = torch.empty(LAYERS, HOSTED, H, I, device="cuda", dtype=torch.bfloat16)
    gate_up.normal_(0.0, 0.02, generator=gen)
    down.normal_(0.0, 0.02, generator=gen)
    report: dict[str, object] = {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        ids = torch.rand(tokens, GLOBAL_EXPERTS, device="cuda", generator=gen).argsort(1)[:, :K]
        ids = torch.where(ids < HOSTED, ids, -1)
        w = torch.rand(tokens, K, device="cuda", generator=gen)
        for kind in kernels:
            routine = LayerAgnosticExperts(gate_up, down, kernels=kind)
            graphed = GraphedExperts(routine, K, torch.bfloat16)
            for _ in range(3):
                routine(5, x, ids, w)
                graphed(5, x, ids, w)
            torch.cuda.synchronize()
            calls = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    routine(5, x, ids, w)
                torch.cuda.synchronize()
            rows = []
            for event in prof.key_averages():
                device_us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
                if device_us > 0 and event.key.split()[0] not in (
                    "cudaLaunchKernel",
                    "cudaDeviceSynchronize",
                ):
                    rows.append((event.key, device_us / calls, event.count // calls))
            rows.sort(key=lambda r: -r[1])
            kernel_rows = [r for r in rows if not r[0].startswith("aten::")]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                graphed(5, x, ids, w)
            end.record()
            end.synchronize()
            graph_us = start.elapsed_time(end) / 10 * 1e3
            print(f"=== {kind} kernels, {tokens} tokens: graph replay {graph_us:.1f} us per call")
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70)
            )
            report[f"{kind}_{tokens}"] = {
                "graph_replay_us": graph_us,
                "kernels_us_per_call": [
                    {"name": name[:120], "us": round(us, 2), "launches": n} for name, us, n in kernel_rows
                ],
            }
            del routine, graphed
            torch.cuda.empty_cache()
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
