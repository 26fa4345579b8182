"""Loading an expert rank's experts into an executor, and warming it up before it serves."""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from asap.emulation import EmulatedExpertPart, parse_compute
from asap.model.config import load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement
from asap.model.random_weights import open_weights
from asap.model.tiny import resolve_model
from expert_svc.config import ExpertServiceConfig
from expert_svc.core import ExpertExecutor

__all__ = ["build_executor", "warm_up"]

logger = logging.getLogger(__name__)


def build_executor(config: ExpertServiceConfig) -> ExpertExecutor:
    """Load this rank's experts (only their tensors are read) and wrap them in an executor.

    With emulated compute nothing is read but config.json: the part sleeps for the modeled time.
    """
    model_dir = resolve_model(config.model)
    model_config = load_config(model_dir)
    placement = ExpertPlacement(model_config.num_experts, config.num_ranks)
    expert_ids = placement.experts_of(config.rank)
    dtype = getattr(torch, config.dtype)
    profile = parse_compute(config.compute)[1]
    part: ExpertPart
    if profile is not None:
        part = EmulatedExpertPart(model_config, expert_ids, profile, dtype=dtype)
        logger.info("expert rank %d emulates experts %s on %s", config.rank, list(expert_ids), profile.name)
    else:
        with open_weights(config.model, model_dir, device=config.device, config=model_config) as reader:
            part = ExpertPart.from_source(reader, model_config, expert_ids, dtype=dtype, device=config.device)
            logger.info(
                "expert rank %d/%d loaded experts %s (%d tensors, %.1f MiB read)",
                config.rank,
                config.num_ranks,
                list(expert_ids),
                len(reader.tensors_read),
                reader.bytes_read / 2**20,
            )
    part.layer_agnostic = "layer-agnostic" in config.optimizations
    return ExpertExecutor(part, queue_depth=config.queue_depth, max_merge_rows=config.max_merge_rows)


async def warm_up(executor: ExpertExecutor) -> None:
    """Two chunks per MoE layer, queued together so they are merged into one computation: the first
    real chunks then pay no first-call costs, of the single or of the merged path (on meta tensors the
    first ``torch.cat`` costs about a second)."""
    part = executor.part
    hidden = torch.zeros(1, part.config.hidden_size, dtype=part.dtype, device=part.device)  # [1, H]
    ids = torch.full((1, part.config.top_k), -1, dtype=torch.int32)
    ids[0, 0] = part.hosted[0]
    weights = torch.zeros(1, part.config.top_k, dtype=torch.float32)
    for layer in part.config.moe_layer_ids:
        futures = [await executor.submit(layer, hidden, ids, weights) for _ in range(2)]
        await asyncio.gather(*futures)
    started = time.monotonic()
    graphs = await executor.prepare()
    if graphs:
        logger.info(
            "captured %d CUDA graphs of the expert routine in %.1fs", graphs, time.monotonic() - started
        )
