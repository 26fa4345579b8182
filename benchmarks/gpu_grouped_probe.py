"""Probe: grouped-GEMM time vs number of groups (one layer's experts vs a whole window of layers)."""

import torch

H, I = 2048, 768
for groups_total, active in ((32, 32), (992, 32), (128, 128), (896, 128)):
    for tokens in (256, 4096, 16384):
        rows = tokens * 8
        w1 = torch.randn(groups_total, 2 * I, H, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16)
        counts = torch.zeros(groups_total, dtype=torch.int64, device="cuda")
        counts[:active] = rows // active
        counts[active - 1] += rows - counts.sum()
        offs = counts.cumsum(0).to(torch.int32)
        for _ in range(3):
            torch._grouped_mm(x, w1, offs=offs)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            torch._grouped_mm(x, w1, offs=offs)
        e.record()
        e.synchronize()
        ms = s.elapsed_time(e) / 10
        print(
            f"groups {groups_total:4d} active {active:3d} tokens {tokens:5d}: {ms:.3f} ms {2 * rows * H * 2 * I / ms / 1e9:.0f} TFLOP/s"
        )
        del w1, x
