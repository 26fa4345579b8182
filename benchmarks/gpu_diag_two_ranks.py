"""One batch of the GPU tests' tiny model over two expert ranks in a fresh process, stacks dumped if it hangs.

The GPU tests run several clusters in one process; this runs one, so a hang that needs the earlier runs'
streams (PyTorch's stream pool, handed out round robin) can be told from one that does not:

    python3 benchmarks/gpu_diag_two_ranks.py fast 60     # plane, seconds before the stacks are dumped
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import tempfile
import time
from pathlib import Path

import torch

from tests.gpu.conftest import make_gpu_model
from tests.gpu.test_cuda_dataplane import _run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("plane", help="data plane of both ends (fast, cuda-ipc, grpc, auto)")
    parser.add_argument("dump_after_s", type=float, help="dump every thread's stack and exit after this")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.dump_after_s, exit=True)
    model = make_gpu_model(Path(tempfile.mkdtemp()) / "m")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    started = time.monotonic()
    firsts, counters = asyncio.run(_run(model, args.plane, prompts, 2))
    print(f"{args.plane}: 2 ranks OK in {time.monotonic() - started:.1f} s", firsts, counters, flush=True)


if __name__ == "__main__":
    main()
