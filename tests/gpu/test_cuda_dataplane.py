"""CUDA ranks end to end: expert ranks in their own processes on the GPUs, an attention rank on cuda:0;
the CUDA IPC data plane is used, results equal the gRPC bytes plane and an in-process reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.dataplane.gpu_flags import flags_available
from asap.model.attention_part import AttentionPart
from asap.model.checkpoint import CheckpointReader
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement, InProcessExperts
from attention_svc.config import AttentionServiceConfig
from attention_svc.server import AttentionService
from tests.procs import ServiceProcess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXPERT_RANKS = 2


def _expert_procs(model: Path, plane: str, ranks: int = EXPERT_RANKS) -> list[ServiceProcess]:
    gpus = torch.cuda.device_count()
    return [
        ServiceProcess(
            f"expert-{r}",
            [
                "-m", "expert_svc", "--model", str(model), "--port", "0", "--rank", str(r),
                "--num-ranks", str(ranks), "--device", f"cuda:{(r + 1) % gpus}", "--dtype", "bfloat16",
                "--data-plane", plane,
            ],
        )
        for r in range(ranks)
    ]  # fmt: skip


def auto_plane() -> str:
    """What auto picks between same-host GPU ranks: the fast plane where stream flags exist."""
    return "fast" if flags_available() else "cuda-ipc"


async def _run(
    model: Path, plane: str, prompts: list[list[int]], ranks: int = EXPERT_RANKS
) -> tuple[list[tuple[int, float]], dict[str, int]]:
    procs = _expert_procs(model, plane, ranks)
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
        assert {link.data_plane for link in links} == {auto_plane() if plane == "auto" else plane}
        counters = {
            "fast_exchanges": sum(getattr(link.plane, "fast_exchanges", 0) for link in links),
            "region": sum(link.region_hidden_bytes for link in links),
            "inline": sum(link.inline_hidden_bytes for link in links),
            "results_by_ref": sum(link.result_ref_bytes for link in links),
            "direct_batches": attention.executor.direct_batches,
            "nixl_exchanges": sum(getattr(link.plane, "nixl_exchanges", 0) for link in links),
            "early_results": sum(getattr(link.plane, "early_results", 0) for link in links),
        }
        firsts = [o.first for o in outcome.results]
        assert all(f is not None for f in firsts)
        return [(f.token_id, f.logprob) for f in firsts if f is not None], counters
    finally:
        if attention is not None:
            await attention.stop(grace_s=0)
        for p in procs:
            p.stop()


def _reference(model: Path, prompts: list[list[int]], ranks: int = EXPERT_RANKS) -> list[tuple[int, float]]:
    config = load_config(model)
    placement = ExpertPlacement(config.num_experts, ranks)
    with CheckpointReader(model) as reader:
        part = AttentionPart.from_source(reader, config, dtype=torch.bfloat16, device="cuda:0")
        experts = [
            ExpertPart.from_source(
                reader, config, placement.experts_of(r), dtype=torch.bfloat16, device="cuda:0"
            )
            for r in range(ranks)
        ]
    logits = part.forward([torch.tensor(p) for p in prompts], InProcessExperts(experts, placement))
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.max(dim=-1)
    return [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]


async def test_cuda_ipc_plane_matches_grpc_and_reference(gpu_model_dir: Path) -> None:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    via_grpc, grpc_counters = await _run(gpu_model_dir, "grpc", prompts)
    via_ipc, ipc_counters = await _run(gpu_model_dir, "cuda-ipc", prompts)
    auto, auto_counters = await _run(gpu_model_dir, "auto", prompts[:2])
    print("grpc", via_grpc, grpc_counters, "\ncuda-ipc", via_ipc, ipc_counters)
    assert (
        grpc_counters["region"] == 0 and grpc_counters["inline"] > 0 and grpc_counters["results_by_ref"] == 0
    )
    assert ipc_counters["inline"] == 0 and ipc_counters["region"] > 0
    assert ipc_counters["results_by_ref"] == ipc_counters["region"]
    assert auto_counters["region"] > 0  # auto picks a same-host plane between same-host GPU ranks
    # Same rows, same expert computations: the data plane does not change a bit of the result.
    assert via_ipc == via_grpc
    assert auto == via_grpc[:2]
    reference = _reference(gpu_model_dir, prompts)
    assert [t for t, _ in via_ipc] == [t for t, _ in reference]
    assert max(abs(a - b) for (_, a), (_, b) in zip(via_ipc, reference, strict=True)) < 0.05
