"""GPU ranks on the NIXL plane (one host: UCX's CUDA transports, slots in GPU memory): expert ranks in
their own processes on the GPUs, an attention rank on cuda:0 (the CUDA tests' ``_run``); every dispatch
goes through NIXL and the results equal the gRPC bytes plane bit for bit. Skipped without CUDA or NIXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.dataplane.nixl_link import nixl_missing
from tests.gpu.test_cuda_dataplane import _run

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(bool(nixl_missing()), reason=nixl_missing() or "NIXL"),
]


async def test_nixl_plane_on_gpus_matches_grpc(gpu_model_dir: Path) -> None:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    via_grpc, grpc_counters = await _run(gpu_model_dir, "grpc", prompts)
    via_nixl, nixl_counters = await _run(gpu_model_dir, "nixl", prompts)
    print("grpc", via_grpc, grpc_counters, "\nnixl", via_nixl, nixl_counters)
    assert grpc_counters["nixl_exchanges"] == 0 and nixl_counters["nixl_exchanges"] > 0
    assert via_nixl == via_grpc  # same rows, same expert computations
