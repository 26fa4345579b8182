"""deepseek_v3 on CUDA: the in-process model matches the CPU one, and expert ranks on the GPU over the CUDA
IPC data plane give the gRPC bytes plane's results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asap.model.reference import load_model
from asap.model.tiny import make_tiny
from tests.gpu.test_cuda_dataplane import _run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def deepseek_gpu_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GEMM-friendly sizes (multiples of 64) for the bf16 grouped GEMMs of the expert ranks."""
    return make_tiny(
        tmp_path_factory.mktemp("gpu-ds") / "m", arch="deepseek_v3", layers=3, hidden=256, experts=16,
        top_k=4, heads=4, expert_intermediate=128, seed=7,
    )  # fmt: skip


def _prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    return [torch.randint(0, 256, (n,), generator=g) for n in (1, 9, 200, 700)]


def test_cuda_matches_cpu(deepseek_gpu_dir: Path) -> None:
    prompts = _prompts()
    cpu_attention, cpu_experts = load_model(deepseek_gpu_dir, expert_ranks=2)
    expected = cpu_attention.forward(prompts, cpu_experts)
    attention, experts = load_model(deepseek_gpu_dir, device="cuda:0", expert_ranks=2)
    got = attention.forward(prompts, experts).cpu()
    assert (got - expected).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    bf16_attention, bf16_experts = load_model(
        deepseek_gpu_dir, device="cuda:0", dtype=torch.bfloat16, expert_ranks=2
    )
    assert (bf16_attention.forward(prompts, bf16_experts).cpu() - expected).abs().max().item() <= 0.1


async def test_cuda_ipc_plane_carries_deepseek(deepseek_gpu_dir: Path) -> None:
    prompts = [p.tolist() for p in _prompts()]
    via_grpc, _ = await _run(deepseek_gpu_dir, "grpc", prompts)
    via_ipc, counters = await _run(deepseek_gpu_dir, "cuda-ipc", prompts)
    assert counters["inline"] == 0 and counters["region"] > 0
    assert via_ipc == via_grpc
