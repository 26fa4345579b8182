"""DeepSeek-V3 pieces of the attention part: YaRN RoPE tables, group-limited sigmoid routing and the
loading of one decoder layer (MLA, router with its correction bias, shared experts, dense first layers).

Everything mirrors ``transformers.models.deepseek_v3`` step for step (float32 routing, the bias used only
to choose experts, YaRN's cos/sin scaling), so the parity tests can demand float rounding only.
"""

from __future__ import annotations

import math

import torch

from asap.model import names
from asap.model.config import ModelConfig
from asap.model.deepseek_config import GroupLimitedRouting, YarnRope, yarn_mscale
from asap.model.layers import DecoderLayerWeights, load_mlp, load_tensor, rope_inv_freq
from asap.model.mla import load_mla, mla_shapes
from asap.model.weights import TensorSource


def yarn_inv_freq(dim: int, theta: float, yarn: YarnRope, device: torch.device) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies [dim / 2] (float32) and the cos/sin scale, as transformers'
    ``_compute_yarn_parameters``: interpolated by ``factor`` below the ``beta_slow`` rotation count,
    extrapolated above ``beta_fast``, linearly blended between."""
    factor = yarn.factor
    attention_factor = yarn.attention_factor
    if attention_factor is None:
        if yarn.mscale and yarn.mscale_all_dim:
            attention_factor = yarn_mscale(factor, yarn.mscale) / yarn_mscale(factor, yarn.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        span = yarn.original_max_position_embeddings / (rotations * 2 * math.pi)
        return (dim * math.log(span)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (original) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_frequencies(config: ModelConfig, device: torch.device) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies [head_dim / 2] of ``config`` and the scale of its cos/sin tables (1.0
    except under YaRN)."""
    if config.yarn is None:
        return rope_inv_freq(config.head_dim, config.rope_theta, device), 1.0
    return yarn_inv_freq(config.head_dim, config.rope_theta, config.yarn, device)


def group_limited_route(
    config: ModelConfig, router: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 top-k of h [T, H] by router [E, H] and correction bias [E]: ids [T, K] int64 and
    weights [T, K] float32 (see ``GroupLimitedRouting``). The bias shifts which experts are chosen, never
    their weights."""
    routing = config.group_routing
    assert isinstance(routing, GroupLimitedRouting)
    e, groups = config.num_experts, routing.n_group
    logits = torch.nn.functional.linear(h.to(torch.float32), router.to(torch.float32))  # [T, E]
    scores = logits.sigmoid()
    choice = scores if bias is None else scores + bias.to(torch.float32)  # [T, E]
    group_scores = choice.view(-1, groups, e // groups).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    best_groups = torch.topk(group_scores, k=routing.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1).bool()  # [T, G]
    expert_mask = group_mask[:, :, None].expand(-1, groups, e // groups).reshape(-1, e)  # [T, E]
    choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = torch.topk(choice, k=config.top_k, dim=-1, sorted=False)[1]  # [T, K]
    weights = scores.gather(1, ids)  # [T, K] unbiased
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * routing.routed_scaling_factor


def deepseek_layer_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of decoder ``layer`` except its routed experts, with its shape."""
    h = config.hidden_size
    roles = mla_shapes(config)
    shapes = {name: roles[role] for role, name in names.attention(config, layer).items()}
    if not config.moe_layers[layer]:
        return shapes | _mlp_shapes(names.dense_mlp(config, layer), h, config.dense_intermediate_size)
    shapes[names.router(config, layer)] = (config.num_experts, h)
    shapes[names.router_bias(config, layer)] = (config.num_experts,)
    if config.shared_expert_intermediate_size:
        width = config.shared_expert_intermediate_size
        shapes |= _mlp_shapes(names.shared_expert(config, layer), h, width)
    return shapes


def _mlp_shapes(n: names.ExpertNames, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {n.gate: (inter, hidden), n.up: (inter, hidden), n.down: (hidden, inter)}


def load_deepseek_layer(
    source: TensorSource, config: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device
) -> DecoderLayerWeights:
    """Read the non-expert tensors of decoder ``layer``. The router and its bias stay float32 whatever
    ``dtype`` is (transformers keeps ``gate.weight`` and ``e_score_correction_bias`` in float32)."""
    h = config.hidden_size
    n = names.attention(config, layer)
    input_norm = load_tensor(source, n["input_norm"], (h,), dtype=dtype, device=device)
    post_norm = load_tensor(source, n["post_attention_norm"], (h,), dtype=dtype, device=device)
    attention = load_mla(source, config, layer, dtype=dtype, device=device)
    if not config.moe_layers[layer]:
        dense = load_mlp(source, config, layer, "dense", dtype=dtype, device=device)
        return DecoderLayerWeights(input_norm, post_norm, attention, dense_mlp=dense)
    e = config.num_experts
    router = load_tensor(source, names.router(config, layer), (e, h), dtype=torch.float32, device=device)
    bias_name = names.router_bias(config, layer)
    bias = load_tensor(source, bias_name, (e,), dtype=torch.float32, device=device)
    shared = None
    if config.shared_expert_intermediate_size:
        shared = load_mlp(source, config, layer, "shared", dtype=dtype, device=device)
    return DecoderLayerWeights(
        input_norm, post_norm, attention, router=router, router_bias=bias, shared_expert=shared
    )
