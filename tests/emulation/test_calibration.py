"""The ``h200`` profile reproduces a measured H200 layer (tests/data/...json) within 20% at every point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from asap.emulation import costs
from asap.emulation.profiles import load_profile
from asap.model.config import ModelConfig, parse_config

DATA = Path(__file__).parents[1] / "data" / "h200_qwen3_30b_a3b_layer.json"
CAL: dict[str, Any] = json.loads(DATA.read_text())
SHAPE = CAL["shape"]
TOLERANCE = 0.20
BF16 = 2


def _config() -> ModelConfig:
    return parse_config(
        {
            "model_type": "qwen3_moe",
            "vocab_size": 151936,
            "hidden_size": SHAPE["hidden"],
            "num_hidden_layers": 1,
            "num_attention_heads": SHAPE["q_heads"],
            "num_key_value_heads": SHAPE["kv_heads"],
            "head_dim": SHAPE["head_dim"],
            "num_experts": SHAPE["experts"],
            "num_experts_per_tok": SHAPE["top_k"],
            "moe_intermediate_size": SHAPE["moe_intermediate"],
            "max_position_embeddings": 40960,
        }
    )


def attention_ms(tokens: int) -> float:
    """The calibration's routine: x@Wq, x@Wkv, causal SDPA over one sequence, @Wo (no norms, no RoPE)."""
    cfg, h = _config(), SHAPE["hidden"]
    kernels = [
        costs.gemm(tokens, cfg.q_size, h, BF16),
        costs.gemm(tokens, 2 * cfg.kv_size, h, BF16),
        costs.causal_attention(cfg, [tokens], BF16),
        costs.gemm(tokens, h, cfg.q_size, BF16),
    ]
    return costs.stream_s(kernels, load_profile("h200")) * 1e3


def experts_ms(tokens: int, local_experts: int) -> float:
    """The calibration's routine: grouped gate_up, SiLU*up, grouped down; tokens*top_k rows spread evenly."""
    rows = tokens * SHAPE["top_k"] // SHAPE["experts"]
    kernels = costs.grouped_mlp([rows] * local_experts, SHAPE["hidden"], SHAPE["moe_intermediate"], BF16)
    return costs.stream_s(kernels, load_profile("h200")) * 1e3


POINTS = (
    [("attention", int(n), ms, attention_ms) for n, ms in CAL["attention_ms_by_prompt_tokens"].items()]
    + [
        ("experts_all_128", int(n), ms, lambda t: experts_ms(t, 128))
        for n, ms in CAL["experts_all_128_ms_by_tokens"].items()
    ]
    + [
        ("experts_shard_of_32", int(n), ms, lambda t: experts_ms(t, 32))
        for n, ms in CAL["experts_shard_of_32_ms_by_tokens"].items()
    ]
)


@pytest.mark.parametrize(
    ("what", "tokens", "measured_ms", "model"), POINTS, ids=[f"{p[0]}-{p[1]}" for p in POINTS]
)
def test_h200_profile_within_20_percent(what: str, tokens: int, measured_ms: float, model: Any) -> None:
    modelled = model(tokens)
    error = modelled / measured_ms - 1
    assert abs(error) <= TOLERANCE, f"{what} at {tokens} tokens: model {modelled:.3f} ms vs {measured_ms} ms"


def test_calibration_file_covers_the_documented_curves() -> None:
    assert len(POINTS) == 24
    assert SHAPE["experts"] % 32 == 0
