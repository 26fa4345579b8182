"""config.json parsing: transformers-written configs, older hub variants, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from asap.errors import CheckpointError, InvalidArgument, UnsupportedArchitecture
from asap.model.config import load_config, parse_config

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)


def _save_hf_config(tmp_path: Path, model_type: str, **overrides: Any) -> Path:
    """config.json exactly as transformers' own save_pretrained writes it."""
    config = transformers.AutoConfig.for_model(model_type, **SMALL, **overrides)
    config.save_pretrained(tmp_path)
    return tmp_path


def test_transformers_written_qwen3_moe(tmp_path: Path) -> None:
    path = _save_hf_config(
        tmp_path, "qwen3_moe", num_local_experts=8, num_experts_per_tok=2, moe_intermediate_size=32
    )
    raw = json.loads((path / "config.json").read_text())
    assert "num_local_experts" in raw and "rope_parameters" in raw  # the transformers 5 spelling
    cfg = load_config(path)
    assert (cfg.model_type, cfg.num_experts, cfg.top_k, cfg.expert_intermediate_size) == (
        "qwen3_moe",
        8,
        2,
        32,
    )
    assert cfg.qk_norm == "per_head" and cfg.head_dim == 16 and cfg.moe_layers == (True, True, True)
    assert cfg.rope_theta == raw["rope_parameters"]["rope_theta"]


def test_transformers_written_qwen2_moe(tmp_path: Path) -> None:
    path = _save_hf_config(
        tmp_path,
        "qwen2_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
        intermediate_size=96,
    )
    cfg = load_config(path)
    assert cfg.shared_expert_intermediate_size == 48 and cfg.attention_bias and cfg.qk_norm == "none"
    assert cfg.moe_layers == (True, False, True) and cfg.dense_intermediate_size == 96


def test_transformers_written_mixtral(tmp_path: Path) -> None:
    path = _save_hf_config(
        tmp_path, "mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=24
    )
    cfg = load_config(path)
    assert (cfg.num_experts, cfg.expert_intermediate_size, cfg.norm_topk_prob) == (4, 24, True)
    assert cfg.rope_theta == 1e6 and cfg.head_dim == 16 and cfg.qk_norm == "none"


def test_transformers_written_olmoe(tmp_path: Path) -> None:
    path = _save_hf_config(
        tmp_path, "olmoe", num_experts=4, num_experts_per_tok=2, intermediate_size=24, clip_qkv=8.0
    )
    cfg = load_config(path)
    assert (cfg.num_experts, cfg.expert_intermediate_size, cfg.qk_norm, cfg.clip_qkv) == (4, 24, "full", 8.0)


def _hub_style(model_type: str, **extra: Any) -> dict[str, Any]:
    """Older hub config.json: ``num_experts`` and a top-level ``rope_theta``."""
    return {
        "model_type": model_type,
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_experts_per_tok": 2,
        "rope_theta": 123456.0,
        **extra,
    }


@pytest.mark.parametrize(
    ("model_type", "extra", "experts", "width"),
    [
        ("qwen3_moe", {"num_experts": 6, "moe_intermediate_size": 8, "head_dim": 32}, 6, 8),
        (
            "qwen2_moe",
            {"num_experts": 6, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 16},
            6,
            8,
        ),
        ("mixtral", {"num_local_experts": 6, "intermediate_size": 12}, 6, 12),
        ("olmoe", {"num_experts": 6, "intermediate_size": 12}, 6, 12),
    ],
)
def test_hub_style_configs(model_type: str, extra: dict[str, Any], experts: int, width: int) -> None:
    cfg = parse_config(_hub_style(model_type, **extra))
    assert (cfg.num_experts, cfg.expert_intermediate_size, cfg.rope_theta) == (experts, width, 123456.0)
    if model_type == "qwen3_moe":
        assert cfg.head_dim == 32  # explicit head_dim wins over hidden // heads


def test_unknown_model_type_is_named() -> None:
    with pytest.raises(UnsupportedArchitecture, match="llama") as info:
        parse_config(_hub_style("llama"))
    assert info.value.model_type == "llama"


def test_missing_key_is_a_checkpoint_error() -> None:
    raw = _hub_style("mixtral", num_local_experts=4)  # no intermediate_size
    with pytest.raises(CheckpointError, match="intermediate_size"):
        parse_config(raw)
    raw = _hub_style("olmoe", num_experts=4, intermediate_size=8)
    del raw["hidden_size"]
    with pytest.raises(CheckpointError, match="hidden_size"):
        parse_config(raw)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
    ],
)
def test_non_default_rope_is_rejected(rope: dict[str, Any]) -> None:
    raw = _hub_style("olmoe", num_experts=4, intermediate_size=8) | rope
    with pytest.raises(InvalidArgument, match="rope type"):
        parse_config(raw)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)
