"""The host split per call (``asap.model.placement._split_on_host``): 16 ranks, top-8 of 256 experts,
shape-only hidden states, the mean of 2,000 calls per size. Run once per tree, back to back:

    PYTHONPATH=TREE python benchmarks/results/s34/speed/split_bench.py
"""

import time

import torch

from asap.model.attention_part import MoERequest
from asap.model.meta import meta_empty
from asap.model.placement import ExpertPlacement, _split_on_host

CALLS = 2000


def main() -> None:
    placement = ExpertPlacement(256, 16)
    g = torch.Generator().manual_seed(0)
    for tokens in (200, 400, 800, 2000):
        ids = torch.stack([torch.randperm(256, generator=g)[:8] for _ in range(tokens)])
        hidden = meta_empty((tokens, 7168), torch.bfloat16)
        request = MoERequest(layer=3, hidden=hidden, topk_ids=ids, topk_weights=torch.rand(tokens, 8))
        start = time.perf_counter()
        for _ in range(CALLS):
            _split_on_host(placement, request)
        print(f"{tokens} tokens: {(time.perf_counter() - start) / CALLS * 1e6:.1f} us per split")


if __name__ == "__main__":
    main()
