"""The emulated cost model and parts on a deepseek_v3 config: MLA's projections, latent cache, routing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from asap.emulation import costs
from asap.emulation.parts import EmulatedAttentionPart
from asap.emulation.profiles import load_profile
from asap.errors import InvalidArgument
from asap.model.config import ModelConfig, parse_config
from asap.model.kvcache import KVCache
from tests.model.test_deepseek import RELEASE

H200 = load_profile("h200")


def deepseek(**over: object) -> ModelConfig:
    return parse_config(RELEASE | {"num_hidden_layers": 5} | over)


def test_attention_flops_follow_the_mla_head_widths() -> None:
    cfg = deepseek()
    assert cfg.mla is not None
    pairs = 4096 * 4097 // 2
    expected = 2.0 * pairs * cfg.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim)
    assert costs.causal_attention(cfg, [4096], 2).flops == expected
    # a cached prefix is expanded through kv_b_proj again: chunks after it cost more than fresh ones
    fresh = costs.attention_layer_s(cfg, 3, [2048], H200, 2)
    assert costs.attention_layer_s(cfg, 3, [2048], H200, 2, prefix_lengths=[8192]) > 2 * fresh


def test_low_rank_queries_and_kv_expansion_are_charged() -> None:
    cfg = deepseek()
    assert cfg.mla is not None
    lora = costs.mla_projection_kernels(cfg, 1024, 0, 2)
    plain = costs.mla_projection_kernels(deepseek(q_lora_rank=None), 1024, 0, 2)
    assert len(lora) == len(plain) + 2  # q_a GEMM and its norm, then q_b instead of q_proj
    heads, r = cfg.num_heads, cfg.mla.kv_lora_rank
    expand = lora[-1]
    assert expand.flops == 2.0 * 1024 * heads * (cfg.mla.qk_nope_head_dim + cfg.mla.v_head_dim) * r
    assert costs.mla_projection_kernels(cfg, 1024, 3072, 2)[-1].flops == 4 * expand.flops
    with pytest.raises(InvalidArgument, match="no multi-head latent attention"):
        costs.mla_projection_kernels(parse_config({**_qwen3()}), 8, 0, 2)


def _qwen3() -> dict[str, object]:
    return {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16}  # fmt: skip


def test_dense_first_layers_and_shared_experts() -> None:
    cfg = deepseek()
    dense = costs.attention_layer_kernels(cfg, 0, [512], 2)
    moe = costs.attention_layer_kernels(cfg, 3, [512], 2)
    # the dense MLP (18432 wide) outweighs router + one shared expert (2048 wide), which has no gate
    assert sum(k.flops for k in dense) > sum(k.flops for k in moe)
    no_shared = costs.attention_layer_kernels(deepseek(n_shared_experts=0), 3, [512], 2)
    assert len(moe) == len(no_shared) + 3  # gate_up, activation, down: no sigmoid-gate GEMM


def test_emulated_part_stages_a_latent_cache() -> None:
    cfg = deepseek(num_hidden_layers=4)
    part = EmulatedAttentionPart(cfg, replace(H200, launch_us=0.0), sleeper=_NoSleep())
    cache = KVCache(cfg.num_layers)
    part.forward([[1] * 30], lambda r: torch.empty_like(r.hidden), caches=[cache])
    assert cache.length == 30
    assert cache.keys(0).shape == (1, 30, 512) and cache.values(0).shape == (1, 30, 64)


class _NoSleep:
    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
