"""The whole model in one process: an attention part and simulated expert ranks over one checkpoint.

This is the reference the distributed services are checked against, and a convenient way to run a
checkpoint end to end without any service.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from asap.model.attention_part import AttentionPart
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement, InProcessExperts
from asap.model.resolve import open_weights, resolve_model


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_ranks: int = 1,
    seed: int = 0,
) -> tuple[AttentionPart, InProcessExperts]:
    """Load a model as an ``AttentionPart`` and ``expert_ranks`` simulated expert ranks (contiguous
    ``ExpertPlacement``), each part reading only its own tensors.

    ``model_dir`` is a checkpoint directory, ``tiny``, or ``random:DIR`` (random weights of
    ``seed``, the same the services generate; see ``asap.model.random_weights``)."""
    path = resolve_model(model_dir)
    config = load_config(path)
    placement = ExpertPlacement(config.num_experts, expert_ranks)
    with open_weights(model_dir, path, device=device, seed=seed, config=config) as source:
        attention = AttentionPart.from_source(source, config, dtype=dtype, device=device)
        parts = [
            ExpertPart.from_source(source, config, placement.experts_of(rank), dtype=dtype, device=device)
            for rank in range(placement.num_ranks)
        ]
    return attention, InProcessExperts(parts, placement)


def prefill_reference(
    model: str | Path | tuple[AttentionPart, InProcessExperts],
    prompts: Sequence[Sequence[int] | torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_ranks: int = 1,
) -> torch.Tensor:
    """Last-position logits [B, V] float32 of ``prompts`` (one batch, unequal lengths allowed).

    ``model`` is a checkpoint directory (loaded with ``load_model(model, dtype=..., device=...,
    expert_ranks=...)``) or an already loaded ``(attention, experts)`` pair, in which case the loading
    keywords are ignored.
    """
    if isinstance(model, tuple):
        attention, experts = model
    else:
        attention, experts = load_model(model, dtype=dtype, device=device, expert_ranks=expert_ranks)
    return attention.forward(prompts, experts)
