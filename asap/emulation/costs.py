"""Roofline cost model: how long a named accelerator takes for each op of a MoE decoder.

Every op is a ``Kernel`` (FLOPs, bytes moved, kind; ``asap.emulation.kernels``). One kernel takes
``max(flops / (peak * efficiency[kind]), bytes / (hbm * memory_efficiency))`` on the device. Kernels of one
call run as an eager framework runs them: the host issues one kernel every ``launch_us`` and the device
executes them in order, so a call of many small kernels costs ``n * launch`` (the flat floor of the
calibration curves) and a call of large ones costs the sum of their device times (``stream_s``). Each
call starts from an idle device because every MoE layer ends in a host synchronisation (the dispatch).

All times are seconds; ``dtype_bytes`` is the size of one model-dtype element (2 for bf16/fp16).
"""

from __future__ import annotations

from collections.abc import Sequence

from asap.emulation.kernels import Kernel, elementwise, gemm, stream_s
from asap.emulation.kernels import KernelKind as KernelKind  # re-exported
from asap.emulation.kernels import kernel_s as kernel_s  # re-exported
from asap.emulation.profiles import DeviceProfile
from asap.errors import InvalidArgument
from asap.model.config import ModelConfig


def causal_attention(
    config: ModelConfig,
    prompt_lengths: Sequence[int],
    dtype_bytes: int,
    prefix_lengths: Sequence[int] | None = None,
) -> Kernel:
    """One variable-length causal attention kernel over the packed prompts (flash-attention style).

    The query at position p attends to ``min(p + 1, window)`` keys, where positions of a chunk start
    after its ``prefix_lengths`` cached tokens (chunked prefill). Each (query, key) pair costs 2*D FLOPs
    for QK^T and 2*D for PV per query head, so a full-causal prompt of n tokens costs ~2*n^2*D*Hq FLOPs
    (half of the square). Traffic: q, k, v and the cached K/V read once, the output written.
    """
    prefixes = list(prefix_lengths) if prefix_lengths is not None else [0] * len(prompt_lengths)
    if len(prefixes) != len(prompt_lengths) or any(p < 0 for p in prefixes):
        raise InvalidArgument(f"prefix lengths {prefixes} do not match prompt lengths {list(prompt_lengths)}")
    window = config.sliding_window
    pairs = sum(_keys_attended(p + 1, p + n, window) for n, p in zip(prompt_lengths, prefixes, strict=True))
    tokens, cached = sum(prompt_lengths), sum(prefixes)
    if config.mla is not None:
        # MLA: per head QK^T over nope + rope dims, PV over v_head_dim; keys and values are the per-head
        # expansions of every attended position's latent (expanded again for each chunk)
        qk, v, heads = config.mla.qk_head_dim, config.mla.v_head_dim, config.num_heads
        flops = 2.0 * pairs * heads * (qk + v)
        if config.sparse_attention is not None:
            flops = sum(
                _dsa_attention_flops(config, n, p) for n, p in zip(prompt_lengths, prefixes, strict=True)
            )
        nbytes = float(tokens * heads * (2 * qk + 2 * v) + cached * heads * (qk + v)) * dtype_bytes
        return Kernel(flops, nbytes, "attention")
    flops = 4.0 * pairs * config.head_dim * config.num_heads
    nbytes = (
        float(tokens * (2 * config.q_size + 2 * config.kv_size) + cached * 2 * config.kv_size) * dtype_bytes
    )
    return Kernel(flops, nbytes, "attention")


def _dsa_attention_flops(config: ModelConfig, tokens: int, prefix: int) -> float:
    """Core-attention FLOPs of one prompt (or chunk) under DeepSeek Sparse Attention.

    While the context fits ``index_topk`` every key is selected: dense MLA, as DeepSeek runs short
    prefills ("masked MHA mode", the DeepSeek-V3.2-Exp report). Beyond it a query may attend to its
    ``index_topk`` selected keys in MLA's MQA mode (the latent shared by all heads: QK^T over
    ``kv_lora_rank + qk_rope_head_dim``, PV over ``kv_lora_rank`` per head; FlashMLA's sparse prefill
    kernel, vLLM's ``flashmla_sparse`` backend), or densely with the non-selected keys masked (MHA
    mode); the cheaper of the two is charged. MQA mode costs 3.4x as much per (query, key) pair for the
    DeepSeek-V3 shape (2 x (576 + 512) vs 2 x (192 + 128) per head), so it wins only for prompts beyond
    ~12.8k tokens: below that DSA's prefill attention costs what dense MLA does, plus the indexer."""
    mla, sparse = config.mla, config.sparse_attention
    if mla is None or sparse is None:
        raise InvalidArgument(f"{config.model_type} has no sparse multi-head latent attention")
    heads = config.num_heads
    dense = (
        2.0 * _keys_attended(prefix + 1, prefix + tokens, None) * heads * (mla.qk_head_dim + mla.v_head_dim)
    )
    if prefix + tokens <= sparse.index_topk:
        return dense
    selected = _keys_attended(prefix + 1, prefix + tokens, sparse.index_topk)
    latent = 2.0 * selected * heads * (mla.kv_lora_rank + mla.qk_rope_head_dim + mla.kv_lora_rank)
    return min(dense, latent)


def indexer_kernels(
    config: ModelConfig,
    prompt_lengths: Sequence[int],
    dtype_bytes: int,
    prefix_lengths: Sequence[int] | None = None,
) -> list[Kernel]:
    """DeepSeek Sparse Attention's lightning indexer for the prompts whose context exceeds ``index_topk``
    (below it every key is selected, so no selection is needed and none is charged); [] for dense models.

    Kernels as the DeepSeek-V3.2-Exp reference runs them (``inference/model.py``, ``Indexer.forward``):
    ``wq_b`` (query latent -> heads x head_dim), ``wk`` (hidden -> head_dim), ``weights_proj`` (hidden ->
    heads), the key's LayerNorm, RoPE, Hadamard rotation and FP8 quantisation (one memory pass), the FP8
    score kernel over every causal (query, key) pair (``fp8_index``: 2 x heads x head_dim FLOPs a pair,
    fp32 scores written) and the top-k over the scores. 8-bit math runs at twice the 16-bit peak on both
    hardware profiles' datasheets (H200 FP8 1,979 dense TFLOP/s; Ascend 910 INT8 512 TOPS), so the score
    kernel's FLOPs are charged at half weight against ``peak_tflops``.
    """
    sparse = config.sparse_attention
    if sparse is None:
        return []
    prefixes = list(prefix_lengths) if prefix_lengths is not None else [0] * len(prompt_lengths)
    long = [(n, p) for n, p in zip(prompt_lengths, prefixes, strict=True) if n + p > sparse.index_topk]
    if not long:
        return []
    t = sum(n for n, _ in long)
    cached = sum(p for _, p in long)
    pairs = sum(_keys_attended(p + 1, p + n, None) for n, p in long)
    h, b = config.hidden_size, dtype_bytes
    heads, dim = sparse.index_n_heads, sparse.index_head_dim
    q_in = config.mla.q_lora_rank if config.mla is not None and config.mla.q_lora_rank else h
    width = t * (heads + 1) * dim
    return [
        gemm(t, heads * dim, q_in, b),
        gemm(t, dim, h, b),
        gemm(t, heads, h, b),
        elementwise(width, width, b),  # k LayerNorm, RoPE, Hadamard rotation, FP8 quantisation
        Kernel(heads * dim * pairs, float(width + cached * dim) + pairs * 4.0, "gemm"),
        Kernel(0.0, pairs * 4.0 + t * sparse.index_topk * 4.0, "memory"),  # top-k over the fp32 scores
    ]


def _keys_attended(first: int, last: int, window: int | None) -> int:
    """Sum of min(x, window) for x in [first, last]: keys seen by queries at positions first-1..last-1."""
    cap = last if window is None else min(last, window)
    below = max(0, cap - first + 1)  # x in [first, cap] counts x
    total = below * (first + cap) // 2 if below else 0
    return total + (last - max(cap, first - 1)) * (window or 0)


def grouped_mlp(rows_per_expert: Sequence[int], hidden: int, inter: int, dtype_bytes: int) -> list[Kernel]:
    """gate_up grouped GEMM, SiLU·up, down grouped GEMM over the experts with rows > 0.

    Each touched expert's weights (gate_up [2I, H], down [H, I]) are read once per call, however many rows
    it has; experts with no rows cost nothing.
    """
    used = [r for r in rows_per_expert if r > 0]
    return grouped_mlp_totals(sum(used), len(used), hidden, inter, dtype_bytes)


def grouped_mlp_totals(rows: int, n_used: int, hidden: int, inter: int, dtype_bytes: int) -> list[Kernel]:
    """``grouped_mlp`` from its two totals: ``rows`` routed in all, over ``n_used`` experts with rows (the
    kernels depend on nothing else; an emulated expert rank counts both in numpy)."""
    gate_up = Kernel(
        4.0 * rows * inter * hidden,
        float(rows * hidden + n_used * 2 * inter * hidden + rows * 2 * inter) * dtype_bytes,
        "grouped_gemm",
    )
    act = elementwise(rows * 2 * inter, rows * inter, dtype_bytes)
    down = Kernel(
        2.0 * rows * inter * hidden,
        float(rows * inter + n_used * hidden * inter + rows * hidden) * dtype_bytes,
        "grouped_gemm",
    )
    return [gate_up, act, down]


def attention_layer_kernels(
    config: ModelConfig,
    layer: int,
    prompt_lengths: Sequence[int],
    dtype_bytes: int,
    prefix_lengths: Sequence[int] | None = None,
) -> list[Kernel]:
    """Kernels of one decoder layer's attention part for a packed batch, in execution order.

    Input norm, q/k/v projections (or MLA's, ``mla_projection_kernels``), q/k norms (when the
    architecture has them), RoPE, causal attention,
    o projection, residual add + post-attention norm, then the router GEMM and its softmax/top-k (MoE
    layers) and the shared expert, or the dense MLP (non-MoE layers), and the final residual add.
    """
    if not 0 <= layer < config.num_layers:
        raise InvalidArgument(f"layer {layer} is outside [0, {config.num_layers})")
    _check_lengths(prompt_lengths)
    t, h, b = sum(prompt_lengths), config.hidden_size, dtype_bytes
    if config.mla is not None:
        cached = sum(prefix_lengths) if prefix_lengths is not None else 0
        kernels = [elementwise(t * h, t * h, b), *mla_projection_kernels(config, t, cached, b)]
        o_width = config.num_heads * config.mla.v_head_dim
    else:
        q, kv = config.q_size, config.kv_size
        kernels = [
            elementwise(t * h, t * h, b),
            gemm(t, q, h, b),
            gemm(t, kv, h, b),
            gemm(t, kv, h, b),
        ]
        if config.qk_norm != "none":
            kernels.append(elementwise(t * (q + kv), t * (q + kv), b))
        kernels.append(elementwise(t * (q + kv), t * (q + kv), b))  # RoPE on q and k
        o_width = q
    kernels += [
        *indexer_kernels(config, prompt_lengths, b, prefix_lengths),
        causal_attention(config, prompt_lengths, b, prefix_lengths),
        gemm(t, h, o_width, b),
        elementwise(2 * t * h, 2 * t * h, b),  # residual add + post-attention norm
    ]
    if config.moe_layers[layer]:
        kernels += [
            gemm(t, config.num_experts, h, b),
            elementwise(t * config.num_experts, 2 * t * config.top_k, 4),
        ]
        if config.shared_expert_intermediate_size:
            kernels += _dense_mlp(t, h, config.shared_expert_intermediate_size, b)
            if config.model_type == "qwen2_moe":
                kernels.append(gemm(t, 1, h, b))  # sigmoid gate of the shared expert
    else:
        kernels += _dense_mlp(t, h, config.dense_intermediate_size, b)
    kernels.append(elementwise(2 * t * h, t * h, b))  # residual add
    return kernels


def mla_projection_kernels(config: ModelConfig, tokens: int, cached: int, dtype_bytes: int) -> list[Kernel]:
    """MLA's projections before attention for ``tokens`` new positions after ``cached`` ones: queries
    (low-rank with its norm, or one GEMM), the compressed latent + RoPE key and its norm, RoPE on the
    queries' and the shared key's rope dims, and the kv_b expansion of every attended position's latent
    into per-head keys and values (the cached prefix is expanded again for each chunk)."""
    mla = config.mla
    if mla is None:
        raise InvalidArgument(f"{config.model_type} has no multi-head latent attention")
    t, h, b, heads = tokens, config.hidden_size, dtype_bytes, config.num_heads
    q_out, r, dr = heads * mla.qk_head_dim, mla.kv_lora_rank, mla.qk_rope_head_dim
    if mla.q_lora_rank is None:
        kernels = [gemm(t, q_out, h, b)]
    else:
        qr = mla.q_lora_rank
        kernels = [gemm(t, qr, h, b), elementwise(t * qr, t * qr, b), gemm(t, q_out, qr, b)]
    rope = t * (heads + 1) * dr
    return [
        *kernels,
        gemm(t, r + dr, h, b),
        elementwise(t * r, t * r, b),  # kv_a_layernorm
        elementwise(rope, rope, b),  # RoPE on q_rot and the shared k_rot
        gemm(t + cached, heads * (mla.qk_nope_head_dim + mla.v_head_dim), r, b),
    ]


def attention_layer_s(
    config: ModelConfig,
    layer: int,
    prompt_lengths: Sequence[int],
    profile: DeviceProfile,
    dtype_bytes: int,
    prefix_lengths: Sequence[int] | None = None,
) -> float:
    """Time (s) of one decoder layer's attention part for a batch (see ``attention_layer_kernels``).

    ``prefix_lengths``: tokens already cached before each prompt (chunked prefill); None for fresh prompts.
    """
    kernels = attention_layer_kernels(config, layer, prompt_lengths, dtype_bytes, prefix_lengths)
    return stream_s(kernels, profile)


def expert_call_s(
    tokens_per_local_expert: Sequence[int], config: ModelConfig, profile: DeviceProfile, dtype_bytes: int
) -> float:
    """Time (s) of one expert rank's call for one layer.

    ``tokens_per_local_expert``: rows routed to each hosted expert (0 allowed). The call gathers the rows
    into expert order, runs the grouped MLP (``grouped_mlp``) and scatters the weighted outputs back; a
    call with no rows costs nothing.
    """
    if any(r < 0 for r in tokens_per_local_expert):
        raise InvalidArgument(f"negative row count in {list(tokens_per_local_expert)}")
    rows = sum(tokens_per_local_expert)
    used = sum(1 for r in tokens_per_local_expert if r > 0)
    return expert_call_totals_s(rows, used, config, profile, dtype_bytes)


def expert_call_totals_s(
    rows: int, experts_used: int, config: ModelConfig, profile: DeviceProfile, dtype_bytes: int
) -> float:
    """``expert_call_s`` from its two totals (``rows`` routed, over ``experts_used`` experts with rows):
    what the call's kernels depend on, so an emulated rank may count them in numpy and reuse the result
    per pair instead of building five kernels from a Python list of every hosted expert each layer."""
    if rows < 0 or experts_used < 0:
        raise InvalidArgument(f"negative row or expert count: {rows}, {experts_used}")
    if rows == 0:
        return 0.0
    h, b = config.hidden_size, dtype_bytes
    kernels = [elementwise(rows * h, rows * h, b)]
    kernels += grouped_mlp_totals(rows, experts_used, h, config.expert_intermediate_size, b)
    kernels.append(elementwise(rows * h, rows * h, b))  # weighted scatter-add of the outputs
    return stream_s(kernels, profile)


def lm_head_s(batch: int, config: ModelConfig, profile: DeviceProfile, dtype_bytes: int) -> float:
    """Time (s) of the final norm and LM head over the last position of ``batch`` prompts."""
    if batch <= 0:
        raise InvalidArgument(f"batch must be positive, got {batch}")
    h = config.hidden_size
    kernels = [elementwise(batch * h, batch * h, dtype_bytes), gemm(batch, config.vocab_size, h, dtype_bytes)]
    return stream_s(kernels, profile)


def request_s(
    config: ModelConfig, prompt_tokens: int, profile: DeviceProfile, dtype_bytes: int, expert_ranks: int
) -> float:
    """Modelled device time (s) of one prompt prefilled alone: every layer's attention part, one expert
    rank's even share of each MoE layer's routed rows, and the LM head.

    A lower bound of what an emulated cluster takes for it (no queueing, batching, transfers or host
    work), so a measured prefill far above it means something other than the devices set the pace.
    """
    if prompt_tokens < 1 or expert_ranks < 1:
        raise InvalidArgument(f"need >= 1 prompt token and expert rank, got {prompt_tokens}, {expert_ranks}")
    local_experts = -(-config.num_experts // expert_ranks)
    rows_per_expert = -(-prompt_tokens * config.top_k // config.num_experts)
    expert = expert_call_s([rows_per_expert] * local_experts, config, profile, dtype_bytes)
    layers = sum(
        attention_layer_s(config, layer, [prompt_tokens], profile, dtype_bytes)
        for layer in range(config.num_layers)
    )
    return layers + expert * len(config.moe_layer_ids) + lm_head_s(1, config, profile, dtype_bytes)


def transfer_s(nbytes: int, profile: DeviceProfile) -> float:
    """Time (s) to move ``nbytes`` over one device-to-device link at the profile's ``link_gbps``."""
    if nbytes < 0:
        raise InvalidArgument(f"nbytes must be >= 0, got {nbytes}")
    return nbytes / (profile.link_gbps * 1e9)


def _dense_mlp(t: int, h: int, inter: int, b: int) -> list[Kernel]:
    return [gemm(t, 2 * inter, h, b), elementwise(t * 2 * inter, t * inter, b), gemm(t, h, inter, b)]


def _check_lengths(prompt_lengths: Sequence[int]) -> None:
    if not prompt_lengths or any(n <= 0 for n in prompt_lengths):
        raise InvalidArgument(
            f"prompt lengths must be a non-empty list of positive ints, got {list(prompt_lengths)}"
        )


def all_reduce_s(nbytes: int, ranks: int, profile: DeviceProfile) -> float:
    """Time (s) of a ring all-reduce of ``nbytes`` over ``ranks`` devices (0 for a single device).

    Each device sends and receives ``2 (n - 1) / n`` of the buffer over its link at ``link_gbps``, in
    ``2 (n - 1)`` steps (reduce-scatter, then all-gather). The whole collective is **one** kernel: NCCL
    and HCCL run the ring's steps as a loop inside one collective kernel that the host issues once, so the
    host pays one ``launch_us``, and each step adds the link's per-step latency
    (``DeviceProfile.collective_step_us``; NCCL's own cost model, ``src/graph/tuning.cc``: a ring
    collective's latency is a base latency plus ``nsteps`` times the per-step hardware latency).
    """
    if ranks < 1 or nbytes < 0:
        raise InvalidArgument(f"need ranks >= 1 and nbytes >= 0, got {ranks} and {nbytes}")
    if ranks == 1:
        return 0.0
    steps = 2 * (ranks - 1)
    return (
        transfer_s(round(nbytes * steps / ranks), profile)
        + profile.launch_us * 1e-6
        + steps * profile.collective_step_us * 1e-6
    )
