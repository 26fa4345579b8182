"""Model configuration parsed from a Hugging Face checkpoint's config.json.

One frozen dataclass describes every supported architecture; per-architecture quirks (q/k norms, shared
experts, top-k normalisation, dense layers) are explicit fields rather than branches on ``model_type``
scattered through the model code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asap.errors import CheckpointError, InvalidArgument, UnsupportedArchitecture
from asap.model.deepseek_config import GroupLimitedRouting, MLAShape, YarnRope, parse_deepseek_v3

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3")

QKNorm = Literal["none", "per_head", "full"]


@dataclass(frozen=True, slots=True)
class SparseAttention:
    """DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp): a lightning indexer scores every (query,
    preceding key) pair with ``index_n_heads`` small heads of ``index_head_dim`` in FP8, and each query
    attends only to the ``index_topk`` keys it scores highest (DeepSeek-V3.2-Exp ``inference/model.py``,
    class ``Indexer``: ``wq_b`` from the query latent, ``wk`` and ``weights_proj`` from the hidden state)."""

    index_topk: int
    index_n_heads: int
    index_head_dim: int

    def __post_init__(self) -> None:
        for name in ("index_topk", "index_n_heads", "index_head_dim"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"sparse attention: {name} must be >= 1, got {getattr(self, name)}")


def parse_sparse_attention(raw: dict[str, Any]) -> SparseAttention | None:
    """DSA's shape from a config.json (``DeepseekV32ForCausalLM``'s keys), None when it has no indexer."""
    if raw.get("index_topk") is None:
        return None
    return SparseAttention(
        index_topk=int(raw["index_topk"]),
        index_n_heads=int(_require(raw, "index_n_heads")),
        index_head_dim=int(_require(raw, "index_head_dim")),
    )


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and behaviour of a MoE decoder, independent of where its parts run."""

    model_type: str
    """One of ``SUPPORTED_MODEL_TYPES``."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Routed experts chosen per token."""
    expert_intermediate_size: int
    """Intermediate width of one routed expert."""
    norm_topk_prob: bool
    """Renormalise the top-k routing weights to sum to one (always true for mixtral)."""
    moe_layers: tuple[bool, ...]
    """Per decoder layer: True where the MLP is a routed MoE, False for a dense MLP."""
    dense_intermediate_size: int = 0
    """Intermediate width of the dense MLP of non-MoE layers (qwen ``mlp_only_layers``)."""
    shared_expert_intermediate_size: int = 0
    """Width of the always-on shared expert (qwen2_moe, gated by a sigmoid); 0 when absent."""
    qk_norm: QKNorm = "none"
    """RMSNorm on queries/keys: per head (qwen3_moe), over the full projection (olmoe), or none."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (qwen2_moe)."""
    clip_qkv: float | None = None
    """Clamp q/k/v projections to [-clip_qkv, clip_qkv] (olmoe option)."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    """Attention window (mixtral option); None attends to the whole prefix."""
    torch_dtype: str = "float32"
    """The checkpoint's stored dtype name."""
    mla: MLAShape | None = None
    """Multi-head latent attention (deepseek_v3) instead of q/k/v projections; then ``head_dim`` is the
    RoPE width and ``num_kv_heads`` equals ``num_heads``."""
    yarn: YarnRope | None = None
    """YaRN RoPE scaling (deepseek_v3); None: default RoPE."""
    group_routing: GroupLimitedRouting | None = None
    """Sigmoid group-limited routing with a correction bias (deepseek_v3); None: softmax top-k."""
    sparse_attention: SparseAttention | None = None
    """DeepSeek Sparse Attention (DeepSeek-V3.2's lightning indexer and top-k key selection), read from
    ``index_topk`` / ``index_n_heads`` / ``index_head_dim``; None: dense attention. Only the emulated cost
    model reads it (``asap.emulation.costs``); the torch model computes dense MLA."""
    weight_block_size: tuple[int, int] | None = None
    """Block shape of FP8 weights stored with ``weight_scale_inv`` (``quantization_config``); None: the
    checkpoint holds no block-quantised weights."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_intermediate_size": self.expert_intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in positive.items():
            if value <= 0:
                raise InvalidArgument(f"{self.model_type}: {name} must be positive, got {value}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidArgument(
                f"{self.model_type}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.top_k > self.num_experts:
            raise InvalidArgument(
                f"{self.model_type}: num_experts_per_tok={self.top_k} exceeds num_experts={self.num_experts}"
            )
        if len(self.moe_layers) != self.num_layers:
            raise InvalidArgument(
                f"{self.model_type}: moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers"
            )
        if not all(self.moe_layers) and self.dense_intermediate_size <= 0:
            raise InvalidArgument(f"{self.model_type}: dense layers need intermediate_size > 0")

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Decoder layer indices that hold routed experts, in order."""
        return tuple(i for i, is_moe in enumerate(self.moe_layers) if is_moe)

    @property
    def kv_cache_layout(self) -> tuple[int, int, int]:
        """What a KV cache keeps per token and layer: (heads, key width, value width). MLA keeps the
        compressed latent as the "key" and the shared RoPE key as the "value", one head of each."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank, self.mla.qk_rope_head_dim
        return self.num_kv_heads, self.head_dim, self.head_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` of a checkpoint directory (or the file itself) into a ``ModelConfig``."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return parse_config(raw)


def _require(raw: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    model_type = raw.get("model_type")
    raise CheckpointError(f"{model_type}: config.json lacks {' / '.join(keys)}")


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = (
        params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    )
    yarn_ok = rope_type == "yarn" and raw.get("model_type") == "deepseek_v3"  # parsed by deepseek_config
    if rope_type not in ("default", None) and not yarn_ok:
        raise InvalidArgument(
            f"{raw.get('model_type')}: rope type {rope_type!r} is not supported (only default)"
        )
    theta = raw.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _weight_block_size(raw: dict[str, Any]) -> tuple[int, int] | None:
    quant = raw.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or not isinstance(block, list | tuple) or len(block) != 2:
        raise InvalidArgument(
            f"{raw.get('model_type')}: quantization_config {quant!r} is not supported "
            "(only block-wise fp8 with weight_block_size [rows, cols])"
        )
    rows, cols = (int(b) for b in block)
    if rows <= 0 or cols <= 0:
        raise InvalidArgument(f"{raw.get('model_type')}: weight_block_size {block} must be positive")
    return rows, cols


def _qwen_moe_layers(raw: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    # transformers: a layer is sparse when not in mlp_only_layers, num_experts > 0 and
    # (layer_idx + 1) % decoder_sparse_step == 0.
    mlp_only = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))


def _qwen_sliding_window(raw: dict[str, Any], model_type: str) -> int | None:
    # transformers: qwen3_moe windows every layer when use_sliding_window is set; qwen2_moe windows only
    # the layers its layer_types marks "sliding_attention", which one model-wide window cannot express.
    if not raw.get("use_sliding_window"):
        return None
    window = raw.get("sliding_window")
    if window is None or int(window) >= int(raw.get("max_position_embeddings") or 4096):
        return None
    if model_type == "qwen2_moe":
        layer_types = raw.get("layer_types") or []
        if "sliding_attention" in layer_types:
            raise InvalidArgument(f"{model_type}: per-layer sliding-window attention is not supported")
        return None
    return int(window)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Build a ``ModelConfig`` from a parsed config.json dictionary."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(str(model_type), SUPPORTED_MODEL_TYPES)
    hidden = int(_require(raw, "hidden_size"))
    num_layers = int(_require(raw, "num_hidden_layers"))
    num_heads = int(_require(raw, "num_attention_heads"))
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    head_dim = int(raw.get("head_dim") or hidden // num_heads)
    common: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        top_k=int(_require(raw, "num_experts_per_tok")),
        rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-6),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        weight_block_size=_weight_block_size(raw),
        extra=raw,
    )
    if model_type == "deepseek_v3":
        return ModelConfig(
            **(common | parse_deepseek_v3(raw, num_layers, num_heads)),
            sparse_attention=parse_sparse_attention(raw),
        )
    if model_type in ("qwen3_moe", "qwen2_moe"):
        is_qwen2 = model_type == "qwen2_moe"
        return ModelConfig(
            **common,
            num_experts=int(_require(raw, "num_experts", "num_local_experts")),
            expert_intermediate_size=int(_require(raw, "moe_intermediate_size")),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            moe_layers=_qwen_moe_layers(raw, num_layers),
            dense_intermediate_size=int(raw.get("intermediate_size") or 0),
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
            if is_qwen2
            else 0,
            qk_norm="none" if is_qwen2 else "per_head",
            attention_bias=bool(raw.get("qkv_bias", True))
            if is_qwen2
            else bool(raw.get("attention_bias", False)),
            sliding_window=_qwen_sliding_window(raw, model_type),
        )
    if model_type == "mixtral":
        return ModelConfig(
            **common,
            num_experts=int(_require(raw, "num_local_experts", "num_experts")),
            expert_intermediate_size=int(_require(raw, "intermediate_size")),
            norm_topk_prob=True,
            moe_layers=(True,) * num_layers,
            sliding_window=raw.get("sliding_window"),
        )
    # olmoe
    clip = raw.get("clip_qkv")
    return ModelConfig(
        **common,
        num_experts=int(_require(raw, "num_experts", "num_local_experts")),
        expert_intermediate_size=int(_require(raw, "intermediate_size")),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        moe_layers=(True,) * num_layers,
        qk_norm="full",
        attention_bias=bool(raw.get("attention_bias", False)),
        clip_qkv=float(clip) if clip is not None else None,
    )
