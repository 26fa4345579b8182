"""Stateless building blocks shared by the attention and expert parts.

Every function reproduces the numerics of the matching ``transformers`` module (RMSNorm in float32 then
cast back, RoPE tables computed in float32 and cast to the model dtype, SiLU-gated MLPs), so a model
assembled from them matches the reference implementation to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from asap.errors import CheckpointError
from asap.model import names
from asap.model.config import ModelConfig
from asap.model.names import ExpertNames
from asap.model.weights import TensorSource

if TYPE_CHECKING:
    from asap.model.mla import MLAWeights

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def load_tensor(
    source: TensorSource,
    name: str,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Read ``name`` from ``source``, check its shape and convert it; ``CheckpointError`` on mismatch."""
    tensor = source.get(name)
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    if not tensor.is_floating_point():
        raise CheckpointError(f"tensor {name!r} has non-floating dtype {tensor.dtype}")
    if tensor.dtype in FP8_DTYPES:  # scales are applied by asap.model.fp8; a bare cast would be wrong
        raise CheckpointError(
            f"tensor {name!r} is {tensor.dtype} but config.json declares no block-wise fp8 quantization"
        )
    return tensor.detach().to(device=device, dtype=dtype).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in float32 and cast back before the weight (as HF)."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """Default RoPE inverse frequencies [head_dim / 2], float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
    return 1.0 / (theta ** (exponents / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [T, head_dim] for integer ``positions`` [T], in ``dtype``, each times
    ``scaling`` in float32 first (YaRN's attention factor; 1.0 is exact)."""
    freqs = positions[:, None].to(torch.float32) * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, D] by the tables [T, D] (the rotate-half convention of HF)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D]
    return x * cos + _rotate_half(x) * sin


ATTENTION_GRANULE = 64
"""Smallest step between the prompt lengths SDPA sees on CUDA (see ``attention_length_bucket``)."""


def attention_length_bucket(n: int) -> int:
    """The length a prompt of ``n`` tokens is padded to for SDPA on CUDA: a multiple of 64 up to 1024,
    then eight steps per power of two (at most 12.5% padding), so prompts up to 16k tokens meet 48 shapes
    and up to 32k 56, instead of one per distinct length."""
    if n < 1:
        return n
    octave_top = 1 << (n - 1).bit_length()  # the power of two >= n
    granule = max(ATTENTION_GRANULE, octave_top // 16)
    return -(-n // granule) * granule


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None = None,
    pad_to_bucket: bool | None = None,
) -> torch.Tensor:
    """Causal self-attention of the last S positions of one sequence of L >= S positions.

    q [S, Hq, D] are the queries of positions L-S .. L-1; k and v [L, Hkv, D] are the keys and values of
    every position (GQA: query head h reads kv head h // (Hq / Hkv)) -> [S, Hq, D]. Query position i
    attends to key positions j <= i, and with ``sliding_window`` w only to those with i - w < j.
    ``pad_to_bucket`` (default: on CUDA) pads a whole prompt to its ``attention_length_bucket``.
    """
    seq_len, num_heads, _ = q.shape
    total = k.shape[0]
    prefix = total - seq_len  # cached positions before the first query
    groups = num_heads // k.shape[1]
    if prefix == 0 and (sliding_window is None or sliding_window >= seq_len):
        # On CUDA the prompt is padded at its end to its length bucket: causal rows never see later
        # positions, so the first S rows are unchanged, and SDPA meets a bounded set of shapes that
        # start-up can warm (cuDNN builds a graph per new shape, ~50 ms each on an H200).
        pad = q.is_cuda if pad_to_bucket is None else pad_to_bucket
        padded = attention_length_bucket(seq_len) if pad else seq_len
        if padded > seq_len:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - seq_len)) for t in (q, k, v))  # [S', heads, D]
        qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, S', D]
        # SDPA's own GQA (kv head h // groups) and is_causal: the kernel path transformers' sdpa takes.
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=padded > 1, scale=scale, enable_gqa=groups > 1
        )  # [1, Hq, S', D]
        return out.squeeze(0).transpose(0, 1)[:seq_len]  # [S, Hq, D]
    first = 0 if sliding_window is None else max(0, prefix - sliding_window + 1)  # oldest key any query sees
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k[first:], v[first:]))  # [1, heads, *, D]
    if groups > 1:
        kh = kh.repeat_interleave(groups, dim=1)  # [1, Hq, L', D]
        vh = vh.repeat_interleave(groups, dim=1)
    query_pos = torch.arange(prefix, total, device=q.device)  # [S]
    key_pos = torch.arange(first, total, device=q.device)  # [L']
    diff = query_pos[:, None] - key_pos[None, :]  # [S, L'] query minus key position
    mask = diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)  # [1, Hq, S, D]
    return out.squeeze(0).transpose(0, 1)  # [S, Hq, D]


@dataclass(frozen=True, slots=True)
class GatedMLP:
    """A SiLU-gated MLP: ``down(silu(gate x) * up x)``; gate/up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def load(
        cls,
        source: TensorSource,
        names: ExpertNames,
        hidden: int,
        intermediate: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> GatedMLP:
        """Read the three projections named by ``names``."""
        return cls(
            gate=load_tensor(source, names.gate, (intermediate, hidden), dtype=dtype, device=device),
            up=load_tensor(source, names.up, (intermediate, hidden), dtype=dtype, device=device),
            down=load_tensor(source, names.down, (hidden, intermediate), dtype=dtype, device=device),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> [N, H]."""
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


@dataclass(frozen=True, slots=True)
class AttentionWeights:
    """Attention of one decoder layer: projections [out, H] (o_proj [H, q_size]), optional biases and
    q/k norms (per head [D] for qwen3_moe, over the whole projection for olmoe)."""

    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass(frozen=True, slots=True)
class DecoderLayerWeights:
    """Everything of one decoder layer except its routed experts."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attention: AttentionWeights | MLAWeights
    """q/k/v attention, or multi-head latent attention (deepseek_v3)."""
    router: torch.Tensor | None = None
    """[E, H] on MoE layers, None on dense layers."""
    router_bias: torch.Tensor | None = None
    """[E] float32 routing correction bias (deepseek_v3's ``e_score_correction_bias``)."""
    dense_mlp: GatedMLP | None = None
    """The MLP of a dense (non-MoE) layer."""
    shared_expert: GatedMLP | None = None
    shared_expert_gate: torch.Tensor | None = None
    """[1, H] sigmoid gate of the shared expert (qwen2_moe)."""


def project_qkv(
    cfg: ModelConfig, a: AttentionWeights, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries [T, Hq, D], keys and values [T, Hkv, D] of h [T, H]: biases, q/k norms, clip_qkv and
    RoPE by the tables [T, D] of each token's position."""
    q = F.linear(h, a.q_proj, a.q_bias)  # [T, Hq*D]
    k = F.linear(h, a.k_proj, a.k_bias)  # [T, Hkv*D]
    v = F.linear(h, a.v_proj, a.v_bias)  # [T, Hkv*D]
    if cfg.qk_norm == "full" and a.q_norm is not None and a.k_norm is not None:
        q = rms_norm(q, a.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, a.k_norm, cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.view(-1, cfg.num_heads, cfg.head_dim)  # [T, Hq, D]
    k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, Hkv, D]
    v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, Hkv, D]
    if cfg.qk_norm == "per_head" and a.q_norm is not None and a.k_norm is not None:
        q = rms_norm(q, a.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, a.k_norm, cfg.rms_norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def route(cfg: ModelConfig, router: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing of h [T, H] by router [E, H]: ids [T, K] int64 and weights [T, K] float32."""
    logits = F.linear(h, router)  # [T, E] model dtype
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(probs, cfg.top_k, dim=-1)  # [T, K]
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if cfg.model_type != "mixtral":
        # transformers casts these routers' weights to the model dtype before scaling expert outputs;
        # keeping the rounded values (exact in float32) makes the expert side match it bit for bit.
        weights = weights.to(logits.dtype).to(torch.float32)
    return ids, weights


def load_mlp(
    source: TensorSource,
    cfg: ModelConfig,
    layer: int,
    kind: Literal["dense", "shared"],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> GatedMLP:
    """The dense MLP of a non-MoE ``layer`` or the shared expert of a MoE one: every family names and
    sizes them the same way, so the Qwen-style and DeepSeek loaders read them here."""
    if kind == "dense":
        mlp_names, width = names.dense_mlp(cfg, layer), cfg.dense_intermediate_size
    else:
        mlp_names, width = names.shared_expert(cfg, layer), cfg.shared_expert_intermediate_size
    return GatedMLP.load(source, mlp_names, cfg.hidden_size, width, dtype=dtype, device=device)


def load_decoder_layer(
    source: TensorSource, cfg: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device
) -> DecoderLayerWeights:
    """Read the non-expert tensors of decoder ``layer``, checking every shape against ``cfg``."""
    h = cfg.hidden_size

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return load_tensor(source, name, shape, dtype=dtype, device=device)

    n = names.attention(cfg, layer)
    shapes = {
        "q_proj": (cfg.q_size, h),
        "k_proj": (cfg.kv_size, h),
        "v_proj": (cfg.kv_size, h),
        "o_proj": (h, cfg.q_size),
        "q_bias": (cfg.q_size,),
        "k_bias": (cfg.kv_size,),
        "v_bias": (cfg.kv_size,),
    }
    if cfg.qk_norm == "per_head":
        shapes |= {"q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    elif cfg.qk_norm == "full":
        shapes |= {"q_norm": (cfg.q_size,), "k_norm": (cfg.kv_size,)}
    attn = {role: get(name, shapes[role]) for role, name in n.items() if role in shapes}
    # qwen3_moe and olmoe put a bias on o_proj too when attention_bias is set; qwen2_moe never does.
    o_bias_name = f"{names.layer_prefix(layer)}self_attn.o_proj.bias"
    if cfg.attention_bias and source.has(o_bias_name):
        attn["o_bias"] = get(o_bias_name, (h,))
    weights = DecoderLayerWeights(
        input_norm=get(n["input_norm"], (h,)),
        post_attention_norm=get(n["post_attention_norm"], (h,)),
        attention=AttentionWeights(**attn),
    )
    if not cfg.moe_layers[layer]:
        dense = load_mlp(source, cfg, layer, "dense", dtype=dtype, device=device)
        return replace(weights, dense_mlp=dense)
    weights = replace(weights, router=get(names.router(cfg, layer), (cfg.num_experts, h)))
    if cfg.shared_expert_intermediate_size > 0:
        shared = load_mlp(source, cfg, layer, "shared", dtype=dtype, device=device)
        gate = get(names.shared_expert_gate(cfg, layer), (1, h))
        weights = replace(weights, shared_expert=shared, shared_expert_gate=gate)
    return weights
