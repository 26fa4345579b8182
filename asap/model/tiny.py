"""Tiny random MoE checkpoints in the Hugging Face layout, and the built-in default model ("tiny").

``make_tiny`` writes what ``save_pretrained`` would: ``config.json`` with the keys transformers writes for
the architecture, ``model.safetensors`` (float32, random, deterministic for the seed), plus a byte-level
``tokenizer.json``. ``transformers.AutoModelForCausalLM.from_pretrained`` loads the result with no
missing or unexpected keys, which is what makes it a correctness oracle for ASAP's own model code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from asap.errors import InvalidArgument, UnsupportedArchitecture
from asap.model.checkpoint import SINGLE_FILE, expected_shapes
from asap.model.config import SUPPORTED_MODEL_TYPES, parse_config
from asap.model.deepseek_config import tiny_config_keys
from asap.model.tokenizer import BYTE_SPECIAL_TOKENS, TOKENIZER_FILE, build_byte_level_tokenizer

TINY_SPEC = "tiny"
"""The ``--model`` value naming the built-in model."""
TINY_DEFAULTS: dict[str, Any] = {
    "arch": "qwen3_moe",
    "layers": 4,
    "hidden": 64,
    "experts": 8,
    "top_k": 2,
    "seed": 0,
}
"""Parameters of the built-in model: small enough to run fast on a CPU."""
TINY_FORMAT_VERSION = 1
"""Bumped whenever ``make_tiny`` output changes, so stale cached models are not reused."""
DEFAULT_VOCAB_SIZE = 320
"""256 byte tokens + specials, padded (as real checkpoints pad their embedding tables)."""

_ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def make_tiny(
    out_dir: str | Path,
    *,
    arch: str = "qwen3_moe",
    layers: int = 4,
    hidden: int = 64,
    experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    expert_intermediate: int | None = None,
    shared_intermediate: int | None = None,
    max_position_embeddings: int = 4096,
    init_std: float = 0.02,
) -> Path:
    """Write a random checkpoint directory for ``arch`` into ``out_dir`` (created; must be empty).

    ``expert_intermediate`` defaults to ``hidden``; ``shared_intermediate`` (qwen2_moe's shared expert)
    to twice the expert width. deepseek_v3 (``tiny_config_keys``) has MLA, so ``kv_heads`` only has to
    divide ``heads``, and one shared expert of the expert width. Returns the directory.
    """
    if arch not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(arch, SUPPORTED_MODEL_TYPES)
    tokenizer = build_byte_level_tokenizer()
    vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    expert_width = hidden if expert_intermediate is None else expert_intermediate
    shared_width = 2 * expert_width if shared_intermediate is None else shared_intermediate
    _validate(
        layers=layers, hidden=hidden, experts=experts, top_k=top_k, heads=heads, kv_heads=kv_heads,
        expert_intermediate=expert_width, shared_intermediate=shared_width,
        max_position_embeddings=max_position_embeddings, init_std=init_std,
        vocab_size=vocab, tokenizer_vocab=tokenizer.get_vocab_size(with_added_tokens=True),
    )  # fmt: skip
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidArgument(f"output directory {out} exists and is not empty")

    eos_id = tokenizer.token_to_id(BYTE_SPECIAL_TOKENS[0])
    common: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_experts_per_tok": top_k,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": init_std,
        "rms_norm_eps": 1e-6 if arch.startswith("qwen") else 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": "float32",
    }
    if arch == "deepseek_v3":
        arch_keys = tiny_config_keys(
            hidden=hidden, heads=heads, experts=experts, top_k=top_k, expert_width=expert_width,
            max_position_embeddings=max_position_embeddings,
        )  # fmt: skip
    else:
        arch_keys = _arch_config(arch, layers, hidden // heads, experts, expert_width, shared_width)
    raw = common | arch_keys
    config = parse_config(raw)

    # One generator, tensors in expected_shapes' fixed order: same seed, same bytes.
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * init_std
        # RMSNorm weights sit around one (HF inits them to exactly one; the jitter makes a test that
        # forgot to apply a norm weight fail).
        tensors[name] = values + 1.0 if name.endswith("norm.weight") else values

    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
    # safetensors creates its file owner-only; give it the umask-derived mode the other files got.
    (out / SINGLE_FILE).chmod(config_path.stat().st_mode & 0o777)
    tokenizer.save(str(out / TOKENIZER_FILE))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": BYTE_SPECIAL_TOKENS[0],
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def _arch_config(
    arch: str, layers: int, head_dim: int, experts: int, expert_width: int, shared_width: int
) -> dict[str, Any]:
    """The architecture-specific config.json keys, named as transformers 5 writes them."""
    if arch == "qwen3_moe":
        return {
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "head_dim": head_dim,
            "intermediate_size": 2 * expert_width,  # dense MLP width; unused while every layer is MoE
            "mlp_only_layers": [],
            "moe_intermediate_size": expert_width,
            "norm_topk_prob": True,  # as in the released Qwen3 MoE checkpoints
            "num_local_experts": experts,
            "sliding_window": None,
            "use_sliding_window": False,
        }
    if arch == "qwen2_moe":
        return {
            "decoder_sparse_step": 1,
            "intermediate_size": shared_width,
            "layer_types": ["full_attention"] * layers,
            "max_window_layers": layers,
            "mlp_only_layers": [],
            "moe_intermediate_size": expert_width,
            "norm_topk_prob": False,
            "num_experts": experts,
            "qkv_bias": True,
            "shared_expert_intermediate_size": shared_width,
            "sliding_window": None,
            "use_sliding_window": False,
        }
    if arch == "mixtral":
        return {
            "head_dim": head_dim,
            "intermediate_size": expert_width,
            "num_local_experts": experts,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        }
    return {  # olmoe
        "attention_bias": False,
        "clip_qkv": None,
        "intermediate_size": expert_width,
        "norm_topk_prob": False,
        "num_experts": experts,
    }


def _validate(*, vocab_size: int, tokenizer_vocab: int, init_std: float, **sizes: int) -> None:
    for name, value in sizes.items():
        if value <= 0:
            raise InvalidArgument(f"make_tiny: {name} must be positive, got {value}")
    hidden, heads, kv_heads = sizes["hidden"], sizes["heads"], sizes["kv_heads"]
    if sizes["top_k"] > sizes["experts"]:
        raise InvalidArgument(f"make_tiny: top_k={sizes['top_k']} exceeds experts={sizes['experts']}")
    if hidden % heads:
        raise InvalidArgument(f"make_tiny: hidden={hidden} is not a multiple of heads={heads}")
    if (hidden // heads) % 2:
        raise InvalidArgument(f"make_tiny: head_dim={hidden // heads} must be even for rotary embeddings")
    if heads % kv_heads:
        raise InvalidArgument(f"make_tiny: heads={heads} is not a multiple of kv_heads={kv_heads}")
    if vocab_size < tokenizer_vocab:
        raise InvalidArgument(
            f"make_tiny: vocab_size={vocab_size} is below the tokenizer's {tokenizer_vocab} ids"
        )
    if not init_std > 0:
        raise InvalidArgument(f"make_tiny: init_std must be positive, got {init_std}")


def tiny_cache_root() -> Path:
    """Where built-in models are cached: ``$ASAP_CACHE_DIR/models``, else ``~/.cache/asap/models``."""
    env = os.environ.get("ASAP_CACHE_DIR")
    root = Path(env) if env else Path.home() / ".cache" / "asap"
    return root / "models"


def tiny_model_name() -> str:
    """Directory name of the built-in model, keyed by its parameters and the generator version."""
    key = json.dumps({"format": TINY_FORMAT_VERSION, **TINY_DEFAULTS}, sort_keys=True)
    return f"tiny-{TINY_DEFAULTS['arch']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """The built-in model's directory, generated on first use and reused after.

    ``cache_dir`` replaces ``tiny_cache_root()``. Generation goes to a temporary sibling directory that is
    renamed into place, so a concurrent or interrupted run never leaves a half-written model behind.
    """
    root = Path(cache_dir) if cache_dir is not None else tiny_cache_root()
    final = root / tiny_model_name()
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        make_tiny(tmp, **TINY_DEFAULTS)
        tmp.chmod(root.stat().st_mode & 0o777)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
