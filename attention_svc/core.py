"""Attention-rank executor: runs batches layer by layer, reaching the experts through a transport.

No grpc here. Each batch is a coroutine that resumes the model's ``forward_steps`` generator on the
compute thread, and at every MoE layer awaits only its own combine results from the expert ranks it
needs. Several batches can be in flight: while one waits for the experts, another computes attention.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from asap.errors import AsapError, InternalError, InvalidArgument
from asap.model.attention_part import AttentionPart, MoERequest
from asap.model.placement import ExpertPlacement, RankDispatch, combine, split_by_rank
from asap.model.sampling import FirstToken, first_token

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20


class ExpertTransport(Protocol):
    """How an attention rank reaches expert ranks (gRPC bytes today; shared memory / CUDA IPC later)."""

    async def exchange(self, rank: int, micro_batch: int, layer: int, dispatch: RankDispatch) -> torch.Tensor:
        """Send one dispatch to expert rank ``rank``; return its combined partial result [n, H]."""
        ...


@dataclass(slots=True)
class PromptSpec:
    """A validated prompt of a batch."""

    request_id: str
    token_ids: torch.Tensor  # [n] int64
    temperature: float = 0.0
    seed: int | None = None
    top_logprobs: int = 0


@dataclass(slots=True)
class PromptOutcome:
    request_id: str
    prompt_tokens: int
    first: FirstToken | None = None
    error: AsapError | None = None


@dataclass(slots=True)
class BatchOutcome:
    results: list[PromptOutcome]
    micro_batch: int
    started_ns: int = 0
    finished_ns: int = 0
    expert_wait_ns: int = 0
    layer_done_ns: list[int] = field(default_factory=list)
    """Wall-clock time (``time.time_ns``) at which each MoE layer's combine completed."""


_Step = tuple[MoERequest, list[RankDispatch]]


class AttentionExecutor:
    """Runs batches on one attention rank. ``close()`` releases the compute thread."""

    def __init__(
        self,
        part: AttentionPart,
        transport: ExpertTransport,
        placement: ExpertPlacement,
        *,
        max_inflight: int = 2,
    ) -> None:
        self.part = part
        self.transport = transport
        self.placement = placement
        self._slots = asyncio.Semaphore(max_inflight)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attention-compute")
        self._micro_batch_ids = itertools.count(1)
        self.inflight = 0

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def make_prompt(
        self,
        request_id: str,
        token_ids: Sequence[int],
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        top_logprobs: int = 0,
    ) -> PromptSpec:
        """Validate one prompt and its sampling options; raises ``InvalidArgument``."""
        if temperature < 0 or temperature != temperature:
            raise InvalidArgument(f"temperature must be >= 0, got {temperature}")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        tokens = self.part.validate_prompt(token_ids)
        return PromptSpec(request_id, tokens, temperature, seed, top_logprobs)

    async def run_batch(self, prompts: Sequence[PromptSpec]) -> BatchOutcome:
        """Prefill a batch; returns each prompt's first token. Transport errors propagate (typed)."""
        async with self._slots:
            self.inflight += 1
            try:
                return await self._run(prompts)
            finally:
                self.inflight -= 1

    async def _run(self, prompts: Sequence[PromptSpec]) -> BatchOutcome:
        micro_batch = next(self._micro_batch_ids)
        outcome = BatchOutcome(results=[], micro_batch=micro_batch, started_ns=time.time_ns())
        if not prompts:
            outcome.finished_ns = time.time_ns()
            return outcome
        loop = asyncio.get_running_loop()
        gen = self.part.forward_steps([p.token_ids for p in prompts])
        try:
            step: _Step | torch.Tensor = await loop.run_in_executor(self._thread, self._advance, gen, None)
            while isinstance(step, tuple):
                request, dispatches = step
                waited = time.monotonic_ns()
                partials = await _all_or_cancel(
                    [self.transport.exchange(d.rank, micro_batch, request.layer, d) for d in dispatches]
                )
                outcome.expert_wait_ns += time.monotonic_ns() - waited
                outcome.layer_done_ns.append(time.time_ns())
                step = await loop.run_in_executor(
                    self._thread, self._advance, gen, (request, dispatches, partials)
                )
            logits = step  # [B, V] float32
        finally:
            await loop.run_in_executor(self._thread, gen.close)
        firsts = await loop.run_in_executor(self._thread, _sample_all, logits, prompts)
        outcome.results = [
            PromptOutcome(p.request_id, int(p.token_ids.numel()), first)
            for p, first in zip(prompts, firsts, strict=True)
        ]
        outcome.finished_ns = time.time_ns()
        return outcome

    def _advance(
        self,
        gen: Generator[MoERequest, torch.Tensor, torch.Tensor],
        previous: tuple[MoERequest, list[RankDispatch], list[torch.Tensor]] | None,
    ) -> _Step | torch.Tensor:
        """On the compute thread: combine the last layer's partials, run to the next MoE layer, split it."""
        try:
            if previous is None:
                request = next(gen)
            else:
                last, dispatches, partials = previous
                routed = combine(last.hidden.shape[0], last.hidden, dispatches, partials)  # [T, H]
                request = gen.send(routed)
        except StopIteration as stop:
            logits: torch.Tensor = stop.value
            return logits
        return request, split_by_rank(self.placement, request)


def _sample_all(logits: torch.Tensor, prompts: Sequence[PromptSpec]) -> list[FirstToken]:
    return [
        first_token(logits[i], temperature=p.temperature, seed=p.seed, top_logprobs=p.top_logprobs)
        for i, p in enumerate(prompts)
    ]


async def _all_or_cancel(calls: Sequence[Awaitable[torch.Tensor]]) -> list[torch.Tensor]:
    """Await all calls; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
        if pending:
            raise InternalError("expert exchange finished with pending calls")
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
