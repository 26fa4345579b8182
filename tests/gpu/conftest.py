"""GPU tests: run on a machine with CUDA (see benchmarks/README.md, "GPU runs"); skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from asap.dataplane.gpu_streams import configure_cuda_connections
from asap.model.tiny import make_tiny

configure_cuda_connections()  # as rank processes do (attention ranks run in this process), before CUDA


def make_gpu_model(path: Path) -> Path:
    """A qwen3_moe checkpoint with GEMM-friendly sizes (multiples of 64) for bf16 grouped GEMMs."""
    return make_tiny(
        path,
        arch="qwen3_moe",
        layers=4,
        hidden=256,
        experts=16,
        top_k=4,
        heads=4,
        kv_heads=2,
        expert_intermediate=128,
        seed=7,
    )


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpu_model(tmp_path_factory.mktemp("gpu") / "m")
