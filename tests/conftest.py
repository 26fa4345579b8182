"""Shared fixtures: tiny checkpoints written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if not os.path.exists("/dev/nvidiactl"):
    # No NVIDIA device here: Triton's kernels can only run through its interpreter, and the mode must be
    # set before Triton is first imported (its own library functions are decorated in that mode too;
    # torch may import Triton early). The Triton tests' ``triton_device`` fixture relies on it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from asap.model.tiny import make_tiny


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen3_moe: q/k norms, 8 experts top-2, 3 layers."""
    return make_tiny(
        tmp_path_factory.mktemp("qwen3") / "m", arch="qwen3_moe", layers=3, experts=8, top_k=2, seed=1
    )


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen2_moe: shared expert with sigmoid gate, 6 experts top-4."""
    return make_tiny(
        tmp_path_factory.mktemp("qwen2") / "m", arch="qwen2_moe", layers=2, experts=6, top_k=4, seed=2
    )


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deepseek_v3: MLA with low-rank queries, YaRN, 2 expert groups of 4 (one eligible), top-2, one
    shared expert, the first of 3 layers dense."""
    return make_tiny(
        tmp_path_factory.mktemp("deepseek") / "m", arch="deepseek_v3", layers=3, experts=8, top_k=2, seed=3
    )
