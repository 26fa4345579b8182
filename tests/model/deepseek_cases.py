"""Tiny random deepseek_v3 checkpoints written by transformers' own ``DeepseekV3ForCausalLM``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asap.model.config import load_config
from tests.model.conftest import TinyModel

BASE: dict[str, Any] = dict(
    vocab_size=160,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=6,
    max_position_embeddings=64,
    initializer_range=0.1,  # routers, biases and experts visibly shape the logits
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    num_nextn_predict_layers=0,
)


def _yarn(factor: float, original: int, **extra: float) -> dict[str, Any]:
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor,
            "original_max_position_embeddings": original, "beta_fast": 32, "beta_slow": 1, **extra}  # fmt: skip


# name -> overrides. Together: q_lora_rank on and off; n_group 1/2/3/4 with topk_group below and equal to
# it; top-k 1..4; norm_topk_prob on and off; scaling factors 1, 1.8, 2.5; 0, 1 and 2 dense first layers;
# 1 or 2 shared experts; YaRN with and without mscale / mscale_all_dim and default RoPE; interleaved and
# rotate-half RoPE; attention biases; tied embeddings; v_head_dim unlike the qk head width.
CASES: dict[str, dict[str, Any]] = {
    "lora-g4t2-k3-norm-yarn-dense1": dict(
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
        n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=True,
        routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
        intermediate_size=32, rope_interleave=True,
        rope_parameters=_yarn(4.0, 16, mscale=1.0, mscale_all_dim=1.0),
    ),
    "noqlora-g1-k2-nonorm-rope-bias-shared2": dict(
        q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=6, v_head_dim=8,
        n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False,
        routed_scaling_factor=1.0, first_k_dense_replace=0, n_shared_experts=2, moe_intermediate_size=12,
        intermediate_size=24, rope_interleave=False, attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "lora-g3t1-k2-yarn-nomscale-dense2-tied": dict(
        q_lora_rank=16, kv_lora_rank=20, qk_nope_head_dim=4, qk_rope_head_dim=8, v_head_dim=4,
        n_routed_experts=9, n_group=3, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True,
        routed_scaling_factor=1.8, first_k_dense_replace=2, n_shared_experts=1, moe_intermediate_size=20,
        intermediate_size=28, rope_interleave=True, tie_word_embeddings=True,
        rope_parameters=_yarn(2.0, 32),
    ),
    "lora-g4t1-k3-overfull-norm": dict(
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3, norm_topk_prob=True,
        routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
        intermediate_size=32, rope_interleave=True, rope_parameters=_yarn(4.0, 16, mscale=1.0, mscale_all_dim=1.0),
    ),
    "noqlora-g2t2-k4-nonorm-yarn-mscale": dict(
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=10, n_group=2, topk_group=2, num_experts_per_tok=4, norm_topk_prob=False,
        routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
        intermediate_size=32, rope_interleave=False,
        rope_parameters=_yarn(8.0, 8, mscale=0.707, mscale_all_dim=0.707),
    ),
    "lora-g2t1-k1-norm-yarn-alldim-kv128": dict(
        num_key_value_heads=128,  # transformers' default whatever the head count; MLA does not read it
        q_lora_rank=32, kv_lora_rank=8, qk_nope_head_dim=10, qk_rope_head_dim=2, v_head_dim=10,
        n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1, moe_intermediate_size=16,
        intermediate_size=32, rope_interleave=True,
        rope_parameters=_yarn(4.0, 16, mscale_all_dim=1.0),
    ),
}  # fmt: skip


def build_deepseek(path: Path, overrides: dict[str, Any], *, seed: int = 0) -> TinyModel:
    """A random deepseek_v3 model built by transformers, its routing correction biases randomised too
    (transformers initialises them to zero, which would hide a bias applied to the weights), saved in
    float32 under ``path``."""
    import transformers

    cfg = transformers.DeepseekV3Config(**(BASE | overrides))
    torch.manual_seed(seed)
    # The eager experts loop is transformers' definitional MoE (its default, grouped_mm, is a kernel).
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, experts_implementation="eager"
    ).eval()
    assert isinstance(hf, transformers.DeepseekV3ForCausalLM)
    with torch.no_grad():
        for layer in hf.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0.0, 0.1)
    hf.save_pretrained(path)
    return TinyModel(name=path.name, path=path, config=load_config(path), hf=hf)
