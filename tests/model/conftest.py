"""Tiny random checkpoints written by ``transformers`` itself, and its logits as the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from asap.model.config import ModelConfig, load_config

transformers = pytest.importorskip("transformers")

COMMON: dict[str, Any] = dict(
    vocab_size=160,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=64,
    # larger than the default 0.02 so experts, routers and clip_qkv visibly shape the logits
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# name -> (model_type, overrides). Together these cover top-k 1/2/4, norm_topk_prob on and off, experts
# not divisible by 2 or 3 ranks, GQA ratios 3 and 2, explicit head_dim, dense layers, shared experts,
# clip_qkv, biases, sliding windows and tied embeddings.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-k2-norm-headdim-bias-mlponly": (
        "qwen3_moe",
        dict(
            num_experts=5,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            moe_intermediate_size=16,
            intermediate_size=40,
            head_dim=12,
            attention_bias=True,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3-k1-sparsestep-kv3-tied": (
        "qwen3_moe",
        dict(
            num_experts=7,
            num_experts_per_tok=1,
            norm_topk_prob=False,
            moe_intermediate_size=24,
            intermediate_size=32,
            num_key_value_heads=3,
            head_dim=16,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-k4-nonorm-window": (
        "qwen3_moe",
        dict(
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            moe_intermediate_size=20,
            head_dim=8,
            use_sliding_window=True,
            sliding_window=6,
        ),
    ),
    "qwen2-k4-shared-kv3": (
        "qwen2_moe",
        dict(
            num_experts=7,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            moe_intermediate_size=16,
            intermediate_size=40,
            shared_expert_intermediate_size=24,
            num_key_value_heads=3,
            mlp_only_layers=[0],
        ),
    ),
    "qwen2-k2-norm-nobias-tied": (
        "qwen2_moe",
        dict(
            num_experts=5,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            moe_intermediate_size=16,
            intermediate_size=40,
            shared_expert_intermediate_size=32,
            qkv_bias=False,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "mixtral-k2-window": (
        "mixtral",
        dict(num_local_experts=5, num_experts_per_tok=2, intermediate_size=24, sliding_window=5),
    ),
    "mixtral-k1-headdim-tied": (
        "mixtral",
        dict(
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size=16,
            head_dim=10,
            tie_word_embeddings=True,
        ),
    ),
    "olmoe-k4-clip": (
        "olmoe",
        dict(num_experts=7, num_experts_per_tok=4, norm_topk_prob=False, intermediate_size=16, clip_qkv=0.6),
    ),
    "olmoe-k2-norm-bias-kv3": (
        "olmoe",
        dict(
            num_experts=5,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            intermediate_size=24,
            attention_bias=True,
            num_key_value_heads=3,
        ),
    ),
}


@dataclass
class TinyModel:
    """A checkpoint on disk plus the ``transformers`` model it was saved from."""

    name: str
    path: Path
    config: ModelConfig
    hf: Any
    _cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    def hf_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        """transformers' last-position logits [V] (float32) of one prompt run alone (memoised)."""
        key = tuple(prompt.tolist())
        if key not in self._cache:
            with torch.no_grad():
                out = self.hf(input_ids=prompt[None, :])
            self._cache[key] = out.logits[0, -1].float()
        return self._cache[key]


def build_tiny(path: Path, model_type: str, overrides: dict[str, Any], *, seed: int = 0) -> TinyModel:
    """A random ``model_type`` model built by ``transformers``, saved in float32 under ``path``."""
    cfg = transformers.AutoConfig.for_model(model_type, **(COMMON | overrides))
    torch.manual_seed(seed)
    # The eager experts loop is transformers' definitional MoE (its default, grouped_mm, is a kernel).
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    hf.save_pretrained(path)
    return TinyModel(name=path.name, path=path, config=load_config(path), hf=hf)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    """``factory(case_name)`` builds the case's checkpoint once per session."""
    cache: dict[str, TinyModel] = {}

    def factory(name: str) -> TinyModel:
        if name not in cache:
            model_type, overrides = CASES[name]
            cache[name] = build_tiny(tmp_path_factory.mktemp(name), model_type, overrides)
        return cache[name]

    return factory


def random_prompt(length: int, vocab: int, seed: int) -> torch.Tensor:
    """A reproducible random prompt [length] int64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator)


@pytest.fixture
def triton_device(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """CUDA where there is one, else CPU tensors through Triton's interpreter (skipped without Triton);
    the kernel modules are reloaded so their kernels are decorated in the mode picked."""
    if torch.cuda.is_available():
        pytest.importorskip("triton")
        return torch.device("cuda")
    # Set before Triton is first imported: its own library functions are decorated in this mode too.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    import importlib

    from asap.model import grouped_triton
    from expert_svc import gpu_step_triton

    importlib.reload(grouped_triton)  # kernels pick interpreted mode when decorated
    importlib.reload(gpu_step_triton)
    return torch.device("cpu")
