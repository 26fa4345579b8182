"""``asap model``: write tiny random checkpoints and describe checkpoints."""

from __future__ import annotations

import argparse
import math
from typing import Any

from asap.commands import SUMMARIES
from asap.model.checkpoint import CheckpointReader, expected_shapes
from asap.model.config import SUPPORTED_MODEL_TYPES, load_config
from asap.model.resolve import resolve_model
from asap.model.tiny import TINY_DEFAULTS, TINY_SPEC, make_tiny
from asap.model.tokenizer import load_tokenizer


def add_parser(subparsers: Any) -> None:
    """Register ``asap model make-tiny`` and ``asap model info``."""
    parser = subparsers.add_parser("model", help=SUMMARIES["model"])
    actions = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")

    make = actions.add_parser(
        "make-tiny",
        help="write a random HF checkpoint (config.json, model.safetensors, byte-level tokenizer.json)",
    )
    make.add_argument("--arch", choices=SUPPORTED_MODEL_TYPES, default=TINY_DEFAULTS["arch"])
    make.add_argument("outdir", metavar="OUTDIR", help="directory to create (must be empty or absent)")
    make.add_argument("--layers", type=int, default=TINY_DEFAULTS["layers"])
    make.add_argument("--hidden", type=int, default=TINY_DEFAULTS["hidden"])
    make.add_argument("--experts", type=int, default=TINY_DEFAULTS["experts"])
    make.add_argument("--top-k", type=int, default=TINY_DEFAULTS["top_k"])
    make.add_argument("--seed", type=int, default=TINY_DEFAULTS["seed"])
    make.set_defaults(func=run_make_tiny)

    info = actions.add_parser("info", help="print a checkpoint's architecture and size")
    info.add_argument("model", metavar=f"PATH|{TINY_SPEC}")
    info.set_defaults(func=run_info)


def run_make_tiny(args: argparse.Namespace) -> int:
    """Write the checkpoint and print its path."""
    path = make_tiny(
        args.outdir,
        arch=args.arch,
        layers=args.layers,
        hidden=args.hidden,
        experts=args.experts,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(path)
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print one ``key: value`` line per property of the checkpoint."""
    path = resolve_model(args.model)
    config = load_config(path)
    shapes = expected_shapes(config)
    params = sum(math.prod(shape) for shape in shapes.values())
    lines: dict[str, object] = {
        "path": path,
        "model_type": config.model_type,
        "layers": config.num_layers,
        "moe_layers": len(config.moe_layer_ids),
        "hidden": config.hidden_size,
        "heads": f"{config.num_heads} (kv {config.num_kv_heads}, head_dim {config.head_dim})",
        "experts": config.num_experts,
        "top_k": config.top_k,
        "expert_intermediate": config.expert_intermediate_size,
        "shared_expert_intermediate": config.shared_expert_intermediate_size,
        "vocab_size": config.vocab_size,
        "params": params,
    }
    if config.mla is not None:
        m = config.mla
        lines["attention"] = (
            f"MLA (q_lora_rank {m.q_lora_rank}, kv_lora_rank {m.kv_lora_rank}, qk {m.qk_nope_head_dim}+"
            f"{m.qk_rope_head_dim}, v {m.v_head_dim}, rope {'yarn' if config.yarn else 'default'})"
        )
    if config.group_routing is not None:
        r = config.group_routing
        lines["routing"] = (
            f"sigmoid, {r.topk_group} of {r.n_group} groups, scaled {r.routed_scaling_factor:g}"
        )
    if path.is_dir() and not any(path.glob("*.safetensors")):
        lines["tensors"] = f"none stored (config only; {len(shapes)} expected)"
    else:
        with CheckpointReader(path) as reader:
            stored = reader.names()
            nbytes = sum(reader.info(name).nbytes for name in stored)
        lines["tensors"] = f"{len(stored)} stored ({nbytes} bytes; {len(shapes)} expected)"
    tokenizer = load_tokenizer(path)
    lines["tokenizer"] = f"{tokenizer.vocab_size} ids" if tokenizer is not None else "none"
    for key, value in lines.items():
        print(f"{key}: {value}")
    return 0
