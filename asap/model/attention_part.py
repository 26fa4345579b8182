"""The attention part of a MoE decoder: everything except the routed experts.

It owns the embeddings, attention (RoPE, GQA, q/k norms, biases, clip_qkv, sliding window, or DeepSeek's
multi-head latent attention in ``asap.model.mla``), the routers,
shared experts, the dense MLPs of non-MoE layers, the final norm and the LM head. At each MoE layer the
forward pass stops and hands a ``MoERequest`` to whoever computes the routed experts — in this process
(``InProcessExperts``) or on remote expert ranks — and resumes with their combined output. A prompt may
be prefilled in consecutive chunks, each attending to the earlier ones' K/V kept in a ``KVCache``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch
import torch.nn.functional as F

from asap.errors import InvalidArgument
from asap.model import names
from asap.model.config import ModelConfig
from asap.model.deepseek import group_limited_route, load_deepseek_layer, rope_frequencies
from asap.model.fp8 import dequantizing
from asap.model.kvcache import KVCache, check_caches
from asap.model.layers import (
    DecoderLayerWeights,
    causal_attention,
    load_decoder_layer,
    load_tensor,
    project_qkv,
    rms_norm,
    rope_cos_sin,
    route,
)
from asap.model.mla import MLAWeights, mla_attention
from asap.model.weights import TensorSource


@dataclass(slots=True)
class MoERequest:
    """The routed-expert work of one MoE layer for all tokens of a batch."""

    layer: int
    """Decoder layer index."""
    hidden: torch.Tensor
    """[T, H] post-attention-layernorm output of every token of the batch (model dtype)."""
    topk_ids: torch.Tensor
    """[T, K] int64 global expert ids chosen per token."""
    topk_weights: torch.Tensor
    """[T, K] float32 routing weights, normalised exactly as the architecture does."""
    rest: Callable[[], None] | None = None
    """What of the layer's work is still to come before its dispatches may go out (the emulated part's
    modelled device time: the host splits and fills the dispatches inside it, as beside a device that
    is still computing), or None. Whoever sends the dispatches calls ``finish`` first."""

    def finish(self) -> None:
        """Run ``rest`` once (blocking until the layer's work is done); a no-op afterwards."""
        rest, self.rest = self.rest, None
        if rest is not None:
            rest()


ExpertCompute = Callable[[MoERequest], torch.Tensor]
"""Computes the routed experts of a ``MoERequest``: returns [T, H] in the model dtype. (Not to be
confused with ``asap.wire.chunks.Dispatch``, a decoded dispatch message.)"""


Prompts = Sequence[Sequence[int] | torch.Tensor]
"""A batch of prompts, each a token id list or a 1-D tensor of ids."""
MoESteps = Generator[MoERequest, torch.Tensor, torch.Tensor]
"""A forward pass paused at every MoE layer: yields ``MoERequest``s, is sent [T, H], returns [B, V]."""
Caches = Sequence[KVCache | None] | None
"""Chunked prefill: per prompt, the K/V cache of its earlier chunks (None: a whole fresh prompt)."""


CacheT = TypeVar("CacheT")


class AttentionModel(Protocol):
    """What a service needs of an attention part: the real ``AttentionPart`` and the emulated
    ``asap.emulation.EmulatedAttentionPart`` both implement it, so an attention rank holds either."""

    config: ModelConfig
    dtype: torch.dtype
    device: torch.device

    def validate_prompt(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The prompt as a 1-D int64 tensor; ``InvalidArgument`` when it is empty or out of range."""
        ...

    def forward_steps(self, prompts: Prompts, *, caches: Caches = None) -> MoESteps:
        """Run a batch, pausing at every MoE layer (see ``AttentionPart.forward_steps``)."""
        ...

    def forward(self, prompts: Prompts, dispatch: ExpertCompute, *, caches: Caches = None) -> torch.Tensor:
        """Run ``forward_steps`` to completion with ``dispatch`` computing the experts: [B, V] float32."""
        ...


class SteppedPart(Generic[CacheT]):
    """Base of the real and the emulated attention part: both implement ``forward_steps``, and
    ``forward`` is that generator driven to completion, the same for both."""

    def forward_steps(self, prompts: Prompts, *, caches: Sequence[CacheT | None] | None = None) -> MoESteps:
        raise NotImplementedError

    def forward(
        self,
        prompts: Prompts,
        dispatch: ExpertCompute,
        *,
        caches: Sequence[CacheT | None] | None = None,
    ) -> torch.Tensor:
        """Run ``forward_steps`` to completion, computing each MoE layer with ``dispatch``: [B, V] float32."""
        return drive_steps(self.forward_steps(prompts, caches=caches), dispatch)


class AttentionPart(SteppedPart[KVCache]):
    """Embeddings, attention, routers, shared experts, dense MLPs, final norm and LM head of a MoE model.

    Weights are plain tensors (no autograd state); the part holds no per-request state, so one instance
    serves any number of concurrent forward passes.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        embed: torch.Tensor,
        layers: Sequence[DecoderLayerWeights],
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.embed = embed  # [V, H]
        self.layers = tuple(layers)
        self.final_norm = final_norm  # [H]
        self.lm_head = lm_head  # [V, H]
        self.inv_freq, self.rope_scaling = rope_frequencies(config, device)  # [D/2], cos/sin scale

    @classmethod
    def from_source(
        cls,
        source: TensorSource,
        config: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> AttentionPart:
        """Read the non-expert tensors of every layer from ``source`` (never an expert tensor)."""
        dev = torch.device(device)
        source = dequantizing(source, config)
        vh = (config.vocab_size, config.hidden_size)
        embed = load_tensor(source, names.EMBED, vh, dtype=dtype, device=dev)
        if config.tie_word_embeddings and not source.has(names.LM_HEAD):
            lm_head = embed
        else:
            lm_head = load_tensor(source, names.LM_HEAD, vh, dtype=dtype, device=dev)
        load_layer = load_deepseek_layer if config.mla is not None else load_decoder_layer
        layers = [load_layer(source, config, i, dtype=dtype, device=dev) for i in range(config.num_layers)]
        final_norm = load_tensor(source, names.FINAL_NORM, (config.hidden_size,), dtype=dtype, device=dev)
        return cls(
            config,
            embed=embed,
            layers=layers,
            final_norm=final_norm,
            lm_head=lm_head,
            dtype=dtype,
            device=dev,
        )

    def validate_prompt(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Check a prompt and return it as an int64 1-D CPU tensor.

        Raises ``InvalidArgument`` for an empty prompt, a non-integer or non-1-D input, a token id outside
        [0, vocab_size), or more tokens than ``max_position_embeddings``.
        """
        try:
            ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InvalidArgument(f"prompt is not a sequence of integer token ids: {exc}") from None
        if ids.ndim != 1:
            raise InvalidArgument(f"prompt must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise InvalidArgument("prompt is empty")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise InvalidArgument(f"prompt token ids must be integers, got dtype {ids.dtype}")
        ids = ids.to(device="cpu", dtype=torch.int64)
        limit = self.config.max_position_embeddings
        if ids.numel() > limit:
            raise InvalidArgument(
                f"prompt has {ids.numel()} tokens, more than max_position_embeddings={limit}"
            )
        bad = ((ids < 0) | (ids >= self.config.vocab_size)).nonzero()
        if bad.numel():
            pos = int(bad[0, 0])
            raise InvalidArgument(
                f"token id {int(ids[pos])} at position {pos} is outside the vocabulary "
                f"[0, {self.config.vocab_size})"
            )
        return ids

    def forward_steps(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        *,
        caches: Sequence[KVCache | None] | None = None,
    ) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
        """Run a batch of prompts, pausing at every MoE layer.

        The prompts are validated now (``InvalidArgument`` is raised by this call, not by the generator).
        The generator yields one ``MoERequest`` per MoE layer, in layer order; the caller sends back the
        routed-expert output [T, H] (model dtype, rows in request order) with ``gen.send(result)``. When
        the last layer is done it returns (``StopIteration.value``) the logits of each prompt's last
        position, [B, V] float32. All state lives in the generator frame, so it may be resumed from any
        thread.

        Chunked prefill: with ``caches[i]`` given, prompt i holds the next chunk of a longer prompt; it
        starts at position ``caches[i].length``, attends to the cached K/V as well as causally within
        itself, and its own K/V are added to ``caches[i]`` when the generator finishes (a generator closed
        early leaves the cache unchanged). ``caches[i]`` None (or no ``caches``) is a whole fresh prompt.
        The logits are those of the chunk's last position.
        """
        if len(prompts) == 0:
            raise InvalidArgument("batch has no prompts")
        ids = [self.validate_prompt(p) for p in prompts]
        slots: list[KVCache | None] = [None] * len(ids) if caches is None else list(caches)
        check_caches(self.config, [int(i.numel()) for i in ids], slots, self.dtype, self.device)
        return self._steps(ids, slots)

    def _steps(
        self, ids: list[torch.Tensor], caches: list[KVCache | None]
    ) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
        cfg = self.config
        lengths = [int(t.numel()) for t in ids]
        starts = [0 if c is None else c.length for c in caches]  # position of each prompt's first token
        tokens = torch.cat(ids).to(self.device)  # [T] packed
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        cos, sin = rope_cos_sin(positions.to(self.device), self.inv_freq, self.dtype, self.rope_scaling)
        x = F.embedding(tokens, self.embed)  # [T, H]
        for layer, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)  # [T, H]
            x = x + self._attention(layer, w, h, cos, sin, lengths, caches)
            h = rms_norm(x, w.post_attention_norm, cfg.rms_norm_eps)  # [T, H]
            if w.dense_mlp is not None:
                x = x + w.dense_mlp(h)
                continue
            assert w.router is not None
            if cfg.group_routing is not None:
                topk_ids, topk_weights = group_limited_route(cfg, w.router, w.router_bias, h)  # [T, K] each
            else:
                topk_ids, topk_weights = route(cfg, w.router, h)  # [T, K] each
            routed = yield MoERequest(layer=layer, hidden=h, topk_ids=topk_ids, topk_weights=topk_weights)
            out = self._check_routed(layer, routed, h)  # [T, H]
            if w.shared_expert is not None:
                shared = w.shared_expert(h)  # [T, H]; qwen2_moe gates it, deepseek_v3 does not
                if w.shared_expert_gate is not None:
                    shared = torch.sigmoid(F.linear(h, w.shared_expert_gate)) * shared
                out = out + shared
            x = x + out
        for cache, n in zip(caches, lengths, strict=True):
            if cache is not None:
                cache.commit(n)
        last = torch.tensor(lengths, device=self.device).cumsum(0) - 1  # [B] last token of each prompt
        x = rms_norm(x[last], self.final_norm, cfg.rms_norm_eps)  # [B, H]
        return F.linear(x, self.lm_head).float()  # [B, V]

    def _attention(
        self,
        layer: int,
        w: DecoderLayerWeights,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lengths: Sequence[int],
        caches: Sequence[KVCache | None],
    ) -> torch.Tensor:
        """Self-attention of every prompt of the packed batch h [T, H] -> [T, H].

        A prompt with a cache also attends to its cached K/V, and stages its own K/V in the cache.
        """
        cfg = self.config
        if isinstance(w.attention, MLAWeights):
            return mla_attention(cfg, w.attention, layer, h, cos, sin, lengths, caches)
        q, k, v = project_qkv(cfg, w.attention, h, cos, sin)  # [T, Hq, D], [T, Hkv, D] x2
        scale = cfg.head_dim**-0.5
        outs = []  # per prompt [S, Hq, D]: attention never crosses prompt boundaries
        start = 0
        for n, cache in zip(lengths, caches, strict=True):
            rows = slice(start, start + n)
            keys, values = k[rows], v[rows]  # [S, Hkv, D]
            if cache is not None:
                cached_k, cached_v = cache.stage(layer, keys.transpose(0, 1), values.transpose(0, 1))
                keys, values = cached_k.transpose(0, 1), cached_v.transpose(0, 1)  # [L, Hkv, D]
            outs.append(
                causal_attention(q[rows], keys, values, scale=scale, sliding_window=cfg.sliding_window)
            )
            start += n
        o = torch.cat(outs).reshape(-1, cfg.q_size)  # [T, Hq*D]
        return F.linear(o, w.attention.o_proj, w.attention.o_bias)  # [T, H]

    def _check_routed(self, layer: int, routed: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(routed, torch.Tensor) or routed.shape != h.shape:
            shape = tuple(routed.shape) if isinstance(routed, torch.Tensor) else type(routed).__name__
            raise InvalidArgument(
                f"layer {layer}: routed-expert output {shape} does not match hidden {tuple(h.shape)}"
            )
        return routed.to(device=h.device, dtype=h.dtype)


def drive_steps(
    steps: Generator[MoERequest, torch.Tensor, torch.Tensor], dispatch: ExpertCompute
) -> torch.Tensor:
    """Run a ``forward_steps`` generator to completion, computing each MoE layer with ``dispatch``."""
    try:
        request = next(steps)
        while True:
            request.finish()
            request = steps.send(dispatch(request))
    except StopIteration as stop:
        logits: torch.Tensor = stop.value
        return logits
