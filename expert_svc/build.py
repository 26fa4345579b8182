"""Loading an expert rank's experts into an executor, and warming it up before it serves."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

import torch

from asap.emulation import DeviceProfile, EmulatedExpertPart
from asap.emulation.clock import Sleeper
from asap.emulation.loading import PartSource
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement
from asap.model.resolve import WeightSource
from expert_svc.config import ExpertServiceConfig
from expert_svc.core import ExpertExecutor

__all__ = ["build_executor", "warm_up"]

logger = logging.getLogger(__name__)


def build_executor(
    config: ExpertServiceConfig, *, sleeper: Sleeper | None = None, compute: Executor | None = None
) -> ExpertExecutor:
    """Load this rank's experts (only their tensors are read) and wrap them in an executor.

    With emulated compute nothing is read but config.json: the part sleeps for the modeled time (through
    ``sleeper`` when given). ``compute``: the executor's compute thread (see ``ExpertExecutor``);
    ``asap simulate`` passes both to run the rank on a virtual clock.
    """
    source = PartSource.of(config.model, config.dtype, config.compute)
    model_config, dtype = source.config, source.dtype
    placement = ExpertPlacement(model_config.num_experts, config.num_ranks)
    expert_ids = placement.experts_of(config.rank)

    def emulated(profile: DeviceProfile) -> ExpertPart:
        logger.info("expert rank %d emulates experts %s on %s", config.rank, list(expert_ids), profile.name)
        return EmulatedExpertPart(model_config, expert_ids, profile, dtype=dtype, sleeper=sleeper)

    def real(reader: WeightSource) -> ExpertPart:
        part = ExpertPart.from_source(reader, model_config, expert_ids, dtype=dtype, device=config.device)
        logger.info(
            "expert rank %d/%d loaded experts %s (%d tensors, %.1f MiB read)",
            config.rank,
            config.num_ranks,
            list(expert_ids),
            len(reader.tensors_read),
            reader.bytes_read / 2**20,
        )
        return part

    part = source.load(device=config.device, emulated=emulated, real=real)
    part.layer_agnostic = "layer-agnostic" in config.optimizations
    return ExpertExecutor(
        part, queue_depth=config.queue_depth, max_merge_rows=config.max_merge_rows, compute=compute
    )


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
