"""Checkpoint tensor names per architecture (Hugging Face layout).

The loaders ask for tensors by these names only, so an attention part never touches an expert tensor and
an expert part touches only the experts it hosts.
"""

from __future__ import annotations

from dataclasses import dataclass

from asap.model.config import ModelConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """Names of one routed expert's three projections: gate [I, H], up [I, H], down [H, I]."""

    gate: str
    up: str
    down: str


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def _moe_prefix(cfg: ModelConfig, layer: int) -> str:
    block = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
    return f"{layer_prefix(layer)}{block}."


def router(cfg: ModelConfig, layer: int) -> str:
    """Router (gate) weight [E, H] of an MoE layer."""
    return f"{_moe_prefix(cfg, layer)}gate.weight"


def expert(cfg: ModelConfig, layer: int, expert_id: int) -> ExpertNames:
    p = f"{_moe_prefix(cfg, layer)}experts.{expert_id}."
    if cfg.model_type == "mixtral":
        return ExpertNames(gate=f"{p}w1.weight", up=f"{p}w3.weight", down=f"{p}w2.weight")
    return ExpertNames(gate=f"{p}gate_proj.weight", up=f"{p}up_proj.weight", down=f"{p}down_proj.weight")


def router_bias(cfg: ModelConfig, layer: int) -> str:
    """Routing correction bias [E] of an MoE layer (deepseek_v3), float32 in checkpoints."""
    return f"{_moe_prefix(cfg, layer)}gate.e_score_correction_bias"


def shared_expert(cfg: ModelConfig, layer: int) -> ExpertNames:
    """The shared expert of an MoE layer (qwen2_moe; deepseek_v3's ``shared_experts``, all of them fused
    into one MLP of n_shared_experts times the expert width)."""
    block = "shared_experts" if cfg.mla is not None else "shared_expert"
    p = f"{layer_prefix(layer)}mlp.{block}."
    return ExpertNames(gate=f"{p}gate_proj.weight", up=f"{p}up_proj.weight", down=f"{p}down_proj.weight")


def shared_expert_gate(cfg: ModelConfig, layer: int) -> str:
    """Sigmoid gate [1, H] of the shared expert (qwen2_moe)."""
    return f"{layer_prefix(layer)}mlp.shared_expert_gate.weight"


def dense_mlp(cfg: ModelConfig, layer: int) -> ExpertNames:
    """The dense MLP of a non-MoE layer (qwen ``mlp_only_layers``)."""
    p = f"{layer_prefix(layer)}mlp."
    return ExpertNames(gate=f"{p}gate_proj.weight", up=f"{p}up_proj.weight", down=f"{p}down_proj.weight")


def attention(cfg: ModelConfig, layer: int) -> dict[str, str]:
    """Attention-side tensors of one decoder layer, keyed by role (norms, projections, biases, q/k norms)."""
    p = layer_prefix(layer)
    if cfg.mla is not None:
        return _mla_attention(cfg, p)
    names = {
        "input_norm": f"{p}input_layernorm.weight",
        "post_attention_norm": f"{p}post_attention_layernorm.weight",
        "q_proj": f"{p}self_attn.q_proj.weight",
        "k_proj": f"{p}self_attn.k_proj.weight",
        "v_proj": f"{p}self_attn.v_proj.weight",
        "o_proj": f"{p}self_attn.o_proj.weight",
    }
    if cfg.attention_bias:
        names |= {
            "q_bias": f"{p}self_attn.q_proj.bias",
            "k_bias": f"{p}self_attn.k_proj.bias",
            "v_bias": f"{p}self_attn.v_proj.bias",
        }
    if cfg.qk_norm != "none":
        names |= {"q_norm": f"{p}self_attn.q_norm.weight", "k_norm": f"{p}self_attn.k_norm.weight"}
    return names


def _mla_attention(cfg: ModelConfig, p: str) -> dict[str, str]:
    """MLA tensors (deepseek_v3), keyed by role; ``*_bias`` only with attention_bias."""
    assert cfg.mla is not None
    a = f"{p}self_attn."
    names = {
        "input_norm": f"{p}input_layernorm.weight",
        "post_attention_norm": f"{p}post_attention_layernorm.weight",
        "kv_a_proj": f"{a}kv_a_proj_with_mqa.weight",
        "kv_a_norm": f"{a}kv_a_layernorm.weight",
        "kv_b_proj": f"{a}kv_b_proj.weight",
        "o_proj": f"{a}o_proj.weight",
    }
    if cfg.mla.q_lora_rank is None:
        names["q_proj"] = f"{a}q_proj.weight"
    else:
        names |= {
            "q_a_proj": f"{a}q_a_proj.weight",
            "q_a_norm": f"{a}q_a_layernorm.weight",
            "q_b_proj": f"{a}q_b_proj.weight",
        }
    if cfg.attention_bias:
        names |= {"kv_a_bias": f"{a}kv_a_proj_with_mqa.bias", "o_bias": f"{a}o_proj.bias"}
        if cfg.mla.q_lora_rank is not None:
            names["q_a_bias"] = f"{a}q_a_proj.bias"
    return names
