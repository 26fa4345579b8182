"""GPU ranks on the NIXL plane (one host: UCX's CUDA transports, slots in GPU memory): expert ranks in
their own processes on the GPUs, an attention rank on cuda:0; every dispatch goes through NIXL and the
results equal the gRPC bytes plane bit for bit. Skipped without CUDA or without NIXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.dataplane.nixl_link import nixl_missing
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from tests.gpu.test_cuda_dataplane import _expert_procs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(bool(nixl_missing()), reason=nixl_missing() or "NIXL"),
]


async def _firsts(model: Path, plane: str, prompts: list[list[int]]) -> tuple[list[tuple[int, float]], int]:
    procs = _expert_procs(model, plane)
    attention = None
    try:
        targets = [p.wait_ready() for p in procs]
        attention = AttentionService(
            AttentionServiceConfig(
                model=str(model), expert_targets=targets, device="cuda:0", dtype="bfloat16", data_plane=plane
            )
        )
        await attention.start()
        assert attention.executor is not None and attention.transport is not None
        outcome = await attention.executor.run_batch(
            [attention.executor.make_prompt(f"p{i}", p, top_logprobs=2) for i, p in enumerate(prompts)]
        )
        links = attention.transport.links
        assert {link.data_plane for link in links} == {plane}
        carried = sum(getattr(link.plane, "nixl_exchanges", 0) for link in links)
        firsts = [o.first for o in outcome.results]
        assert all(f is not None for f in firsts)
        return [(f.token_id, f.logprob) for f in firsts if f is not None], carried
    finally:
        if attention is not None:
            await attention.stop(grace_s=0)
        for p in procs:
            p.stop()


async def test_nixl_plane_on_gpus_matches_grpc(gpu_model_dir: Path) -> None:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    via_grpc, none = await _firsts(gpu_model_dir, "grpc", prompts)
    via_nixl, carried = await _firsts(gpu_model_dir, "nixl", prompts)
    print("grpc", via_grpc, "\nnixl", via_nixl, carried)
    assert none == 0 and carried > 0
    assert via_nixl == via_grpc  # same rows, same expert computations
