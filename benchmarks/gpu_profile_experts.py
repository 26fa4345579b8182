"""Kernel-level profile of one layer-agnostic expert call (diagnostics for benchmarks/gpu_experts.py)."""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from asap.model.grouped import LayerAgnosticExperts

H, I, K, E, L = 2048, 768, 8, 32, 48
for tokens in (256, 2048, 16384):
    gate_up = torch.randn(L, E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    down = torch.randn(L, E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    r = LayerAgnosticExperts(gate_up, down)
    x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(tokens, E, device="cuda").argsort(1)[:, :K]
    w = torch.rand(tokens, K, device="cuda")
    for _ in range(3):
        r(5, x, ids, w)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            r(5, x, ids, w)
        torch.cuda.synchronize()
    print(f"=== tokens {tokens}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    torch.cuda.empty_cache()
