"""The DeepSeek-V3 parts of a ``ModelConfig``: MLA shapes, YaRN RoPE and group-limited sigmoid routing.

``model_type`` ``deepseek_v3`` (DeepSeek-V3/R1, Moonlight; the base of V3.2) as transformers'
``DeepseekV3Config`` reads it. Kept out of ``asap.model.config`` so that module stays one table of the
common fields; ``parse_deepseek_v3`` returns the architecture-specific keyword arguments of
``ModelConfig``. Semantics follow ``transformers.models.deepseek_v3`` exactly (defaults included), and a
config transformers cannot run (groups that do not split the experts into groups of two or more, more
eligible groups than groups, an odd RoPE width) is refused here with the values named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from asap.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class MLAShape:
    """Multi-head latent attention: queries through an optional low-rank ``q_lora_rank`` bottleneck, keys
    and values expanded per head from one compressed latent of ``kv_lora_rank`` plus a RoPE key of
    ``qk_rope_head_dim`` shared by every head."""

    q_lora_rank: int | None
    """Rank of the query bottleneck (q_a_proj -> q_a_layernorm -> q_b_proj); None: a plain q_proj."""
    kv_lora_rank: int
    """Width of the compressed KV latent: what the KV cache keeps per token (with the RoPE key)."""
    qk_nope_head_dim: int
    """Per-head query/key dimensions without position encoding."""
    qk_rope_head_dim: int
    """Per-head query dimensions with RoPE; the key's RoPE part is one vector shared by all heads."""
    v_head_dim: int
    rope_interleave: bool
    """RoPE over interleaved pairs (x0, x1), (x2, x3), ... instead of the rotate-half halves."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True)
class YarnRope:
    """YaRN context extension (transformers' ``_compute_yarn_parameters``) and DeepSeek's softmax-scale
    correction ``mscale_all_dim``."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    """Scale of the cos/sin tables; None: inferred from ``factor``, ``mscale`` and ``mscale_all_dim``."""
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    scale_factor: float | None = None
    """The ``factor`` key as config.json gives it (the softmax correction reads only this one)."""


@dataclass(frozen=True, slots=True)
class GroupLimitedRouting:
    """DeepSeek-V3 routing (``noaux_tc``): sigmoid scores in float32; a per-expert correction bias added
    for the choice only; the experts split into ``n_group`` groups, each scored by the sum of its two best
    biased scores, and only the ``topk_group`` best groups eligible; the chosen experts' unbiased scores
    (renormalised when ``norm_topk_prob``) times ``routed_scaling_factor`` are the weights."""

    n_group: int
    topk_group: int
    routed_scaling_factor: float


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 for no extension)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(mla: MLAShape, yarn: YarnRope | None) -> float:
    """Attention softmax scale: ``qk_head_dim ** -0.5``, times ``yarn_mscale(factor, mscale_all_dim) ** 2``
    under YaRN with ``mscale_all_dim`` set (transformers' ``yarn_apply_mscale``)."""
    scale = float(mla.qk_head_dim**-0.5)
    if yarn is not None and yarn.mscale_all_dim:
        factor = yarn.scale_factor if yarn.scale_factor is not None else yarn.factor
        m = yarn_mscale(factor, yarn.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The RoPE dictionary of config.json: ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    return params if isinstance(params, dict) else {}


def parse_yarn(raw: dict[str, Any]) -> YarnRope | None:
    """YaRN parameters of a config.json, None for default RoPE; ``InvalidArgument`` for another type."""
    params = rope_params(raw)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type != "yarn":
        raise InvalidArgument(
            f"{raw.get('model_type')}: rope type {rope_type!r} is not supported (only default and yarn)"
        )
    max_positions = int(raw.get("max_position_embeddings") or 4096)
    original = int(
        raw.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or max_positions
    )
    given = params.get("factor")
    factor = float(given) if given is not None else max_positions / original

    def optional(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else float(value)

    return YarnRope(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=optional("attention_factor"),
        mscale=optional("mscale"),
        mscale_all_dim=optional("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        scale_factor=None if given is None else float(given),
    )


def _int(raw: dict[str, Any], key: str, default: int, *, null: int | None = None) -> int:
    """``raw[key]`` as an int; ``default`` when the key is absent, ``null`` (else ``default``) when null."""
    if key not in raw:
        return default
    value = raw[key]
    if value is None:
        return default if null is None else null
    return int(value)


def parse_deepseek_v3(raw: dict[str, Any], num_layers: int, num_heads: int) -> dict[str, Any]:
    """The ``ModelConfig`` keyword arguments specific to a deepseek_v3 config.json (transformers' defaults
    where a key is absent)."""
    # num_key_value_heads is not read: MLA expands keys and values for every head (transformers'
    # DeepseekV3Config defaults it to 128 whatever the head count, and its sdpa path ignores it).
    for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if raw.get(key) is not None and raw[key] != expected:
            raise InvalidArgument(f"deepseek_v3: {key}={raw[key]!r} is not supported (only {expected!r})")
    q_lora = raw.get("q_lora_rank", 1536)
    mla = MLAShape(
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=_int(raw, "kv_lora_rank", 512),
        qk_nope_head_dim=_int(raw, "qk_nope_head_dim", 128),
        qk_rope_head_dim=_int(raw, "qk_rope_head_dim", 64),
        v_head_dim=_int(raw, "v_head_dim", 128),
        rope_interleave=bool(raw.get("rope_interleave", True)),
    )
    routing = GroupLimitedRouting(
        n_group=_int(raw, "n_group", 8, null=1),  # null: one group, no group limit
        topk_group=_int(raw, "topk_group", 4, null=1),
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5)),
    )
    experts = _int(raw, "n_routed_experts", _int(raw, "num_local_experts", 256))
    expert_width = _int(raw, "moe_intermediate_size", 2048)
    dense = min(_int(raw, "first_k_dense_replace", 3, null=0), num_layers)
    _check(mla, routing, experts, _int(raw, "num_experts_per_tok", 8))
    return dict(
        num_kv_heads=num_heads,
        head_dim=mla.qk_rope_head_dim,  # transformers' config.head_dim: the RoPE width
        num_experts=experts,
        expert_intermediate_size=expert_width,
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        moe_layers=tuple(i >= dense for i in range(num_layers)),
        dense_intermediate_size=_int(raw, "intermediate_size", 18432),
        shared_expert_intermediate_size=expert_width * _int(raw, "n_shared_experts", 1),
        attention_bias=bool(raw.get("attention_bias", False)),
        mla=mla,
        yarn=parse_yarn(raw),
        group_routing=routing,
    )


def _check(mla: MLAShape, routing: GroupLimitedRouting, experts: int, top_k: int) -> None:
    dims = {
        "kv_lora_rank": mla.kv_lora_rank,
        "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim,
        "n_group": routing.n_group,
        "topk_group": routing.topk_group,
    }
    if mla.q_lora_rank is not None:
        dims["q_lora_rank"] = mla.q_lora_rank
    for name, value in dims.items():
        if value <= 0:
            raise InvalidArgument(f"deepseek_v3: {name} must be positive, got {value}")
    if mla.qk_nope_head_dim < 0 or mla.qk_rope_head_dim % 2:
        raise InvalidArgument(
            f"deepseek_v3: qk_nope_head_dim={mla.qk_nope_head_dim} must be >= 0 and "
            f"qk_rope_head_dim={mla.qk_rope_head_dim} even"
        )
    g, tg = routing.n_group, routing.topk_group
    if experts % g or experts // g < 2 or tg > g:
        raise InvalidArgument(
            f"deepseek_v3: n_routed_experts={experts} must split into n_group={g} groups of >= 2 "
            f"experts, and topk_group={tg} must not exceed n_group"
        )
    if top_k > experts:
        raise InvalidArgument(f"deepseek_v3: num_experts_per_tok={top_k} exceeds n_routed_experts={experts}")
    # top_k above the topk_group groups' experts is allowed: like transformers, the rest of the top-k then
    # comes from the masked (-inf) experts in torch.topk's order, with their real scores as weights.


def tiny_config_keys(
    *, hidden: int, heads: int, experts: int, top_k: int, expert_width: int, max_position_embeddings: int
) -> dict[str, Any]:
    """The deepseek_v3 keys of a tiny random checkpoint's config.json (``asap model make-tiny``), named as
    transformers 5 writes them: the shapes of DeepSeek-V3 scaled down (low-rank queries, a latent of half
    the hidden width, RoPE on a third of each query head, interleaved), two expert groups of which one is
    eligible per token where the experts allow it, one shared expert, the first layer dense, and YaRN x4
    with the softmax correction."""
    head_dim = hidden // heads
    groups = 2 if experts % 2 == 0 and experts >= 4 else 1
    per_group = experts // groups
    return {
        "num_key_value_heads": heads,
        "q_lora_rank": 3 * hidden // 4,
        "kv_lora_rank": hidden // 2,
        "qk_nope_head_dim": head_dim,
        "qk_rope_head_dim": 2 * max(1, head_dim // 4),
        "v_head_dim": head_dim,
        "rope_interleave": True,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "moe_intermediate_size": expert_width,
        "intermediate_size": 2 * expert_width,
        "first_k_dense_replace": 1,
        "n_group": groups,
        "topk_group": min(groups, -(-top_k // per_group)),
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "attention_bias": False,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": max(1, max_position_embeddings // 4),
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-6,
    }
