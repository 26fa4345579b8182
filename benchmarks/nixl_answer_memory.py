"""What the expert rank's answer memory costs per layer on a NIXL link, in this process: computing the
[N, H] results into a fresh tensor and registering it for the WRITE (the code before the per-slot
buffers) against computing them into the end's registered buffer of the slot (``NixlEnd.buffers``).
The real ``ExpertPart`` of the benchmark model (hidden 2048, every expert slot -1, as in
``benchmarks/nixl_dataplane.py``), one torch thread, median of ``--iters``.

    python3 benchmarks/nixl_answer_memory.py --tokens 1024,8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

import torch

from asap.dataplane.fastlink import LinkGeometry
from asap.dataplane.nixl_link import NixlEnd
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.tiny import make_tiny

H, K = 2048, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="1024,8192")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokens = [int(t) for t in args.tokens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny(
            Path(tmp) / "m", layers=1, hidden=H, experts=8, top_k=K, expert_intermediate=16, heads=16
        )
        config = load_config(model)
        with CheckpointReader(model) as reader:
            part = ExpertPart.from_source(reader, config, range(8), dtype=torch.bfloat16)
    geometry = LinkGeometry(slots=2, slot_bytes=max(tokens) * (H * 2 + 2 * K * 4) + (1 << 20), hidden_size=H,
                            top_k=K, itemsize=2)  # fmt: skip
    end = NixlEnd("m", geometry, torch.device("cpu"))
    try:
        for n in tokens:
            hidden = torch.randn(n, H).to(torch.bfloat16)
            ids = torch.full((n, K), -1, dtype=torch.int32)
            weights = torch.full((n, K), 1.0 / K)
            fresh, pooled = [], []
            for i in range(args.iters + 3):
                start = time.perf_counter()
                out = part.compute(0, hidden, ids, weights)
                end._deregister(end.register(out))
                fresh.append(time.perf_counter() - start)
                del out
                start = time.perf_counter()
                into = end.buffers.get(i % 2)[: n * H * 2].view(torch.bfloat16).view(n, H)
                part.compute_into(0, hidden, ids, weights, into)
                assert end.buffers.owns(into)
                pooled.append(time.perf_counter() - start)
            f, p = (statistics.median(t[3:]) * 1e3 for t in (fresh, pooled))
            print(f"{n:6d} rows: fresh output + registration {f:7.2f} ms, into the slot's buffer {p:7.2f} ms")
    finally:
        end.close()


if __name__ == "__main__":
    main()
