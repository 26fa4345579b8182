"""Multi-head latent attention (DeepSeek-V2/V3), with transformers' numerics.

Per token, ``kv_a_proj_with_mqa`` makes a compressed latent [kv_lora_rank] (RMS-normed) and one RoPE key
[qk_rope_head_dim] shared by every head. Those two — not per-head keys and values — are what a KV cache
keeps (``ModelConfig.kv_cache_layout``: the latent in the cache's key buffer, the RoPE key in its value
buffer, one "head" each), which is also what a decode engine would receive. ``kv_b_proj`` expands the
latent of every attended position into per-head keys (nope part) and values each time a chunk runs;
queries come from ``q_proj`` or the low-rank ``q_a_proj -> q_a_layernorm -> q_b_proj``. Attention itself
is ordinary causal attention with head widths qk = nope + rope and v, scaled by ``softmax_scale``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asap.model import names
from asap.model.config import ModelConfig
from asap.model.deepseek_config import MLAShape, softmax_scale
from asap.model.kvcache import KVCache
from asap.model.layers import apply_rope, causal_attention, load_tensor, rms_norm
from asap.model.weights import TensorSource


@dataclass(frozen=True, slots=True)
class MLAWeights:
    """MLA of one decoder layer. Shapes: kv_a_proj [r + dr, H], kv_a_norm [r], kv_b_proj
    [Hq * (dn + dv), r], o_proj [H, Hq * dv]; q_proj [Hq * (dn + dr), H] or q_a_proj [q_r, H], q_a_norm
    [q_r], q_b_proj [Hq * (dn + dr), q_r]; biases (attention_bias) on q_a, kv_a and o."""

    kv_a_proj: torch.Tensor
    kv_a_norm: torch.Tensor
    kv_b_proj: torch.Tensor
    o_proj: torch.Tensor
    q_proj: torch.Tensor | None = None
    q_a_proj: torch.Tensor | None = None
    q_a_norm: torch.Tensor | None = None
    q_b_proj: torch.Tensor | None = None
    q_a_bias: torch.Tensor | None = None
    kv_a_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


def _shape(cfg: ModelConfig) -> MLAShape:
    if cfg.mla is None:
        raise ValueError(f"{cfg.model_type} has no multi-head latent attention")
    return cfg.mla


def mla_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every MLA role that ``names.attention`` may name for ``cfg``."""
    m, h, heads = _shape(cfg), cfg.hidden_size, cfg.num_heads
    q_out = heads * m.qk_head_dim
    q_rank = m.q_lora_rank or 0
    # fmt: off
    return {
        "input_norm": (h,), "post_attention_norm": (h,),
        "kv_a_proj": (m.kv_lora_rank + m.qk_rope_head_dim, h), "kv_a_norm": (m.kv_lora_rank,),
        "kv_b_proj": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        "o_proj": (h, heads * m.v_head_dim),
        "q_proj": (q_out, h), "q_a_proj": (q_rank, h), "q_a_norm": (q_rank,), "q_b_proj": (q_out, q_rank),
        "q_a_bias": (q_rank,), "kv_a_bias": (m.kv_lora_rank + m.qk_rope_head_dim,), "o_bias": (h,),
    }
    # fmt: on


def load_mla(
    source: TensorSource, cfg: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device
) -> MLAWeights:
    """Read the MLA tensors of decoder ``layer``, checking each shape."""
    shapes = mla_shapes(cfg)
    roles = {
        role: load_tensor(source, name, shapes[role], dtype=dtype, device=device)
        for role, name in names.attention(cfg, layer).items()
        if role not in ("input_norm", "post_attention_norm")
    }
    return MLAWeights(**roles)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE over interleaved pairs (x0, x1), (x2, x3), ... of x [T, heads, D] by the rotate-half tables
    [T, D] (whose first half holds each pair's angle); the result is laid out de-interleaved (rotated
    evens, then odds), bit for bit as transformers' ``apply_rotary_pos_emb_interleave``. Queries and keys
    get the same permutation, so their dot products are those of the interleaved rotation."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]  # [T, 1, D/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def mla_project(
    cfg: ModelConfig, w: MLAWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [T, Hq, dn + dr] (RoPE applied), the normed KV latent [T, r] and the rotated shared RoPE
    key [T, dr] of h [T, H], by the RoPE tables [T, dr] of each token's position."""
    m = _shape(cfg)
    if w.q_proj is not None:
        q = F.linear(h, w.q_proj)  # [T, Hq*dqk]
    else:
        assert w.q_a_proj is not None and w.q_a_norm is not None and w.q_b_proj is not None
        q_latent = rms_norm(F.linear(h, w.q_a_proj, w.q_a_bias), w.q_a_norm, cfg.rms_norm_eps)  # [T, q_r]
        q = F.linear(q_latent, w.q_b_proj)
    q = q.view(-1, cfg.num_heads, m.qk_head_dim)  # [T, Hq, dqk]
    q_pass, q_rot = torch.split(q, [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    compressed = F.linear(h, w.kv_a_proj, w.kv_a_bias)  # [T, r + dr]
    latent, k_rot = torch.split(compressed, [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    latent = rms_norm(latent, w.kv_a_norm, cfg.rms_norm_eps)  # [T, r]
    rope = apply_rope_interleaved if m.rope_interleave else apply_rope
    q_rot = rope(q_rot, cos, sin)  # [T, Hq, dr]
    k_rot = rope(k_rot[:, None, :], cos, sin)[:, 0]  # [T, dr]
    return torch.cat((q_pass, q_rot), dim=-1), latent, k_rot


def mla_expand(
    cfg: ModelConfig, w: MLAWeights, latent: torch.Tensor, k_rot: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys [L, Hq, dn + dr] and values [L, Hq, dv] of cached-or-fresh positions: the latent
    [L, r] through kv_b_proj, the shared RoPE key [L, dr] copied into every head."""
    m = _shape(cfg)
    kv = F.linear(latent, w.kv_b_proj).view(-1, cfg.num_heads, m.qk_nope_head_dim + m.v_head_dim)
    k_nope, values = torch.split(kv, [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    keys = torch.cat((k_nope, k_rot[:, None, :].expand(-1, cfg.num_heads, -1)), dim=-1)
    return keys, values


def mla_attention(
    cfg: ModelConfig,
    w: MLAWeights,
    layer: int,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lengths: Sequence[int],
    caches: Sequence[KVCache | None],
) -> torch.Tensor:
    """MLA self-attention of every prompt of the packed batch h [T, H] -> [T, H].

    A prompt with a cache stages its latent and RoPE key there and attends to the cached positions too.
    """
    m = _shape(cfg)
    q, latent, k_rot = mla_project(cfg, w, h, cos, sin)  # [T, Hq, dqk], [T, r], [T, dr]
    scale = softmax_scale(m, cfg.yarn)
    outs = []  # per prompt [S, Hq, dv]: attention never crosses prompt boundaries
    start = 0
    for n, cache in zip(lengths, caches, strict=True):
        rows = slice(start, start + n)
        lat, rot = latent[rows], k_rot[rows]  # [S, r], [S, dr]
        if cache is not None:
            cached_lat, cached_rot = cache.stage(layer, lat[None], rot[None])  # [1, L, r], [1, L, dr]
            lat, rot = cached_lat[0], cached_rot[0]
        keys, values = mla_expand(cfg, w, lat, rot)  # [L, Hq, dqk], [L, Hq, dv]
        outs.append(causal_attention(q[rows], keys, values, scale=scale))
        start += n
    o = torch.cat(outs).reshape(-1, cfg.num_heads * m.v_head_dim)  # [T, Hq*dv]
    return F.linear(o, w.o_proj, w.o_bias)  # [T, H]
