"""Clusters of the GPU tests one after another in one process, each with its own switches: which
sequence makes an expert rank of a later cluster never become ready (issue 14, the early-results hang of
``tests/gpu/test_gpu_fast.py::test_hot_path_early_results_and_fills_match_grpc``).

Each argument is one cluster (one expert rank in its own process, the attention rank in this one, as
``tests/gpu/test_cuda_dataplane._run``), run in order over the test's prompts:

    grpc     gRPC bytes
    fast     the fast plane, defaults
    hot      + ``ASAP_GPU_HOT_PATH=1``
    lean     + ``ASAP_GPU_LEAN_FILL=1``
    early    + ``ASAP_GPU_HOST_FREE=1``
    done     + ``ASAP_GPU_DEVICE_DONE=1``
    oldfill  hot path, ``ASAP_GPU_LEAN_FILL=0``

    python3 benchmarks/gpu_early_probe.py grpc lean early done oldfill --ready-s 40

Each cluster prints its wall time, its counters and whether its first tokens and logprobs equal the first
cluster's; a cluster whose expert is not ready in ``--ready-s`` fails with the expert's last output, and
the probe stops there (exit 1). ``--stacks DIR`` makes this process dump every thread's stack there every
``--stacks-s`` seconds (the children do the same when ``sitecustomize`` of ``benchmarks/results/gpu14d``
is on their path: ``ASAP_FH_DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asap.dataplane.gpu_streams import configure_cuda_connections

SWITCHES: dict[str, tuple[str, dict[str, str]]] = {
    "grpc": ("grpc", {}),
    "fast": ("fast", {}),
    "hot": ("fast", {"ASAP_GPU_HOT_PATH": "1"}),
    "lean": ("fast", {"ASAP_GPU_HOT_PATH": "1", "ASAP_GPU_LEAN_FILL": "1"}),
    "early": ("fast", {"ASAP_GPU_HOT_PATH": "1", "ASAP_GPU_LEAN_FILL": "1", "ASAP_GPU_HOST_FREE": "1"}),
    "done": (
        "fast",
        {
            "ASAP_GPU_HOT_PATH": "1",
            "ASAP_GPU_LEAN_FILL": "1",
            "ASAP_GPU_HOST_FREE": "1",
            "ASAP_GPU_DEVICE_DONE": "1",
        },
    ),
    "oldfill": ("fast", {"ASAP_GPU_HOT_PATH": "1", "ASAP_GPU_LEAN_FILL": "0"}),
}
_SET = sorted({name for _, env in SWITCHES.values() for name in env})


async def run(names: list[str], ranks: int) -> int:
    import torch

    from tests.gpu.conftest import make_gpu_model
    from tests.gpu.test_cuda_dataplane import _run

    model = make_gpu_model(Path(tempfile.mkdtemp()) / "m")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    first: list[tuple[int, float]] | None = None
    for name in names:
        plane, env = SWITCHES[name]
        for var in _SET:
            os.environ.pop(var, None)
        os.environ.update(env)
        start = time.perf_counter()
        print(f"--- {name}: {plane} {env}", flush=True)
        try:
            results, counters = await _run(model, plane, prompts, ranks)
        except Exception as exc:
            print(f"{name}: FAILED after {time.perf_counter() - start:.1f} s: {exc}", flush=True)
            return 1
        same = "first" if first is None else ("equal" if results == first else f"DIFFERENT {results}")
        first = first or results
        print(f"{name}: {time.perf_counter() - start:.1f} s, {same}, {counters}", flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("clusters", nargs="+", choices=sorted(SWITCHES))
    parser.add_argument("--ranks", type=int, default=1, help="expert ranks (processes) per cluster")
    parser.add_argument("--ready-s", type=float, default=40.0, help="how long an expert may take to start")
    parser.add_argument("--stacks", help="directory for this process's periodic stack dumps")
    parser.add_argument("--stacks-s", type=float, default=30.0)
    args = parser.parse_args()
    configure_cuda_connections()  # as the test session's conftest does, before CUDA
    print("CUDA_DEVICE_MAX_CONNECTIONS", os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"), flush=True)
    from tests.procs import ServiceProcess

    kwdefaults: dict[str, Any] = ServiceProcess.__init__.__kwdefaults__ or {}
    kwdefaults["ready_timeout_s"] = args.ready_s
    if args.stacks:
        Path(args.stacks).mkdir(parents=True, exist_ok=True)
        dump = open(Path(args.stacks) / f"probe-{os.getpid()}.log", "w")  # noqa: SIM115 (kept open)
        faulthandler.dump_traceback_later(args.stacks_s, repeat=True, file=dump)
    sys.exit(asyncio.run(run(args.clusters, args.ranks)))


if __name__ == "__main__":
    main()
