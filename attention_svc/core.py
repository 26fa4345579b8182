"""Attention-rank executor: runs batches layer by layer, reaching the experts through a transport.

No grpc here. Each batch is a coroutine that resumes the model's ``forward_steps`` generator on the
compute thread, and at every MoE layer awaits only its own combine results from the expert ranks it
needs. Several batches can be in flight: while one waits for the experts, another computes attention.

Async-mode batches whose every link offers the hot path (``asap.dataplane.direct``; the CPU ``fast``
plane) run on the compute thread alone (``attention_svc.direct_runner``): the event loop is involved when
the batch starts and ends, not per layer. Sync modes and the other planes keep the per-layer path here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from asap.dataplane.direct import DirectLink
from asap.devices import ready_event, use_own_stream
from asap.model.attention_part import AttentionModel, MoERequest
from asap.model.kvcache import KVCache
from asap.model.placement import ExpertPlacement, RankDispatch, combine, split_by_rank
from asap.model.sampling import FirstToken
from asap.sampling_options import check_sampling
from asap.syncstep import SyncStep
from asap.telemetry import setup, spans
from attention_svc.batch import (
    AttentionStats,
    BatchOutcome,
    PromptOutcome,
    PromptSpec,
    prompt_outcomes,
    sample_all,
)
from attention_svc.direct_runner import DirectBatch, DirectRunner
from attention_svc.exchange import ExpertTransport, exchange_all, with_empty_dispatches

if TYPE_CHECKING:
    from opentelemetry.context import Context

__all__ = [
    "AttentionExecutor",
    "AttentionStats",
    "BatchOutcome",
    "ExpertTransport",
    "PromptOutcome",
    "PromptSpec",
]

logger = logging.getLogger(__name__)

_Step = tuple[MoERequest, list[RankDispatch]]
_T = TypeVar("_T")


class AttentionExecutor:
    """Runs batches on one attention rank. ``close()`` releases the compute thread."""

    def __init__(
        self,
        part: AttentionModel,
        transport: ExpertTransport,
        placement: ExpertPlacement,
        *,
        max_inflight: int = 2,
        compute: Executor | None = None,
    ) -> None:
        """``compute``: where the model's steps run, one at a time in order; default a thread of its own
        (``asap simulate`` passes a virtual device, whose steps take modelled time on a virtual clock)."""
        self.part = part
        self.transport = transport
        self.placement = placement
        self._slots = asyncio.Semaphore(max_inflight)
        self._thread: Executor = compute or ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="attention-compute",
            initializer=use_own_stream,
            initargs=(part.device,),
        )
        self._micro_batch_ids = itertools.count(1)
        self.inflight = 0
        self._runner = DirectRunner(self._thread, self._advance)
        self.direct_batches = 0
        """Batches run on the hot path (compute thread only, ``attention_svc.direct_runner``)."""
        self.hot_path = True
        """Whether async batches may take the hot path where the planes offer it (benchmarks compare)."""
        self.stats = AttentionStats()
        self._count_routes = bool(getattr(transport, "counts_routes", False))
        """The transport hands each dispatch's counts per expert to in-process expert ranks, which then
        do not count its ids again (``split_by_rank(count=True)``; ``asap.sim``'s direct plane)."""

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
        cache: KVCache | None = None,
        more_chunks: bool = False,
    ) -> PromptSpec:
        """Validate one prompt (or chunk) and its sampling options; raises ``InvalidArgument``."""
        check_sampling(temperature, top_logprobs)
        tokens = self.part.validate_prompt(token_ids)
        return PromptSpec(request_id, tokens, temperature, seed, top_logprobs, cache, more_chunks)

    async def run_batch(
        self,
        prompts: Sequence[PromptSpec],
        *,
        sync: SyncStep | None = None,
        trace: Context | None = None,
    ) -> BatchOutcome:
        """Prefill a batch; returns each prompt's first token. Transport errors propagate (typed).

        ``sync`` runs it as part of that global step: every MoE layer exchanges with every expert rank
        (empty where nothing routes there), and an empty batch still takes part.
        ``trace``: the ``attention.batch`` span's context; with tracing on, per-layer spans go under it.
        """
        async with self._slots:
            self.inflight += 1
            stats = self.stats
            stats.busy.begin()
            try:
                outcome = await self._run(prompts, sync, trace if setup.TRACING_ENABLED else None)
            except BaseException:
                stats.failed_batches += 1
                raise
            finally:
                self.inflight -= 1
                stats.busy.end()
            stats.batches += 1
            stats.prompts += len(prompts)
            stats.tokens += sum(int(p.token_ids.numel()) for p in prompts)
            return outcome

    async def on_compute_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the compute thread, where per-thread state lives (cuDNN keeps its graphs per
        thread): what the service's warm-up runs before SERVING."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _on_thread(self, timed: bool, fn: Callable[..., _T], *args: Any) -> tuple[_T, int, int]:
        """``fn(*args)`` on the compute thread; ``timed``: also its start and end (``time.time_ns``),
        taken on the thread, so time spent queued behind the other micro-batch is not counted."""
        loop = asyncio.get_running_loop()
        if not timed:
            return await loop.run_in_executor(self._thread, fn, *args), 0, 0
        return await loop.run_in_executor(self._thread, _timed, fn, *args)

    async def _run(
        self, prompts: Sequence[PromptSpec], sync: SyncStep | None, trace: Context | None
    ) -> BatchOutcome:
        micro_batch = next(self._micro_batch_ids)
        outcome = BatchOutcome(results=[], micro_batch=micro_batch, started_ns=time.time_ns())
        if not prompts:
            if sync is not None:
                await self._run_empty(sync, outcome, trace)
            outcome.finished_ns = time.time_ns()
            return outcome
        loop = asyncio.get_running_loop()
        timed = trace is not None
        caches = [p.cache for p in prompts]
        tokens = [p.token_ids for p in prompts]
        gen = (
            self.part.forward_steps(tokens, caches=caches)
            if any(c is not None for c in caches)
            else self.part.forward_steps(tokens)
        )
        all_ranks = sync is not None
        links = self._direct_links() if sync is None else None
        if links is not None:
            return await self._run_direct(micro_batch, outcome, gen, links, prompts, trace)
        try:
            step: _Step | torch.Tensor
            step, start_ns, end_ns = await self._on_thread(timed, self._advance, gen, None, all_ranks)
            while isinstance(step, tuple):
                request, dispatches = step
                if trace is not None:
                    attributes = {
                        spans.LAYER: request.layer,
                        spans.MICRO_BATCH: micro_batch,
                        spans.TOKENS: int(request.hidden.shape[0]),
                    }
                    spans.record(spans.ATTENTION_LAYER, trace, start_ns, end_ns, attributes)
                partials = await exchange_all(self.transport, outcome, request.layer, dispatches, sync, trace)
                previous = (request, dispatches, partials)
                step, start_ns, end_ns = await self._on_thread(timed, self._advance, gen, previous, all_ranks)
            logits = step  # [B, V] float32
        finally:
            await loop.run_in_executor(self._thread, gen.close)
        # The last advance (combine, final norm, lm_head) and sampling make up ``attention.sample``.
        firsts, _, sampled_ns = await self._on_thread(timed, sample_all, logits, prompts)
        if trace is not None:
            spans.record(
                spans.ATTENTION_SAMPLE, trace, start_ns, sampled_ns, {spans.MICRO_BATCH: micro_batch}
            )
        outcome.results = prompt_outcomes(prompts, firsts)
        outcome.finished_ns = time.time_ns()
        return outcome

    def _direct_links(self) -> Sequence[DirectLink] | None:
        """The transport's hot path for this batch, when every link has one (``Unavailable`` raised when
        a link cannot be set up, as its first exchange would)."""
        direct_links = getattr(self.transport, "direct_links", None)
        if direct_links is None or not self.hot_path:
            return None
        links: Sequence[DirectLink] | None = direct_links(self.part.config.top_k)
        return links

    async def _run_direct(
        self,
        micro_batch: int,
        outcome: BatchOutcome,
        gen: Generator[MoERequest, torch.Tensor, torch.Tensor],
        links: Sequence[DirectLink],
        prompts: Sequence[PromptSpec],
        trace: Context | None,
    ) -> BatchOutcome:
        """The batch on the compute thread alone (``DirectRunner``); sampling ends it there too."""

        def finish(logits: torch.Tensor) -> list[FirstToken | None]:
            return sample_all(logits, prompts)

        # ``finish`` must not refer to the batch: a batch reachable from itself is a reference cycle, which
        # keeps its tensors until a full garbage collection (rare in a long-lived process: RSS grew ~400 B
        # per prompt in a soak). The runner records the sampling span.
        batch = DirectBatch(micro_batch, gen, links, finish, trace)
        self.direct_batches += 1
        firsts = await self._runner.run(batch)
        outcome.expert_wait_ns = batch.expert_wait_ns
        outcome.results = prompt_outcomes(prompts, firsts)
        outcome.finished_ns = time.time_ns()
        return outcome

    async def _run_empty(self, sync: SyncStep, outcome: BatchOutcome, trace: Context | None) -> None:
        """An idle rank in a sync step: empty dispatches to every expert rank at every MoE layer."""
        for layer in self.part.config.moe_layer_ids:
            await exchange_all(self.transport, outcome, layer, self._with_empty_dispatches([]), sync, trace)

    def _with_empty_dispatches(self, present: list[RankDispatch]) -> list[RankDispatch]:
        """``present`` plus an empty dispatch for every other expert rank (sync mode talks to all of them)."""
        return with_empty_dispatches(present, self.placement.num_ranks, self.part.config, self.part.dtype)

    def _advance(
        self,
        gen: Generator[MoERequest, torch.Tensor, torch.Tensor],
        previous: tuple[MoERequest, list[RankDispatch], list[torch.Tensor]] | None,
        all_ranks: bool = False,
        hold: bool = False,
    ) -> _Step | torch.Tensor:
        """On the compute thread: combine the last layer's partials, run to the next MoE layer, split it.
        The layer's work is finished (``MoERequest.finish``) after the split, or left to the caller with
        ``hold``, who then finishes it before the dispatches go out (and may fill them first)."""
        try:
            if previous is None:
                request = next(gen)
            else:
                last, dispatches, partials = previous
                inputs_ready = getattr(self.part, "inputs_ready", None)  # emulated: the layer's clock
                if inputs_ready is not None:
                    inputs_ready()
                routed = combine(last.hidden.shape[0], last.hidden, dispatches, partials)  # [T, H]
                for partial in partials:
                    if partial.is_cuda:  # made on the transport's streams, read on this one
                        partial.record_stream(torch.cuda.current_stream(partial.device))
                request = gen.send(routed)
        except StopIteration as stop:
            logits: torch.Tensor = stop.value
            return logits
        dispatches = split_by_rank(self.placement, request, count=self._count_routes)
        if all_ranks:
            dispatches = self._with_empty_dispatches(dispatches)
        ready = ready_event(self.part.device)
        for dispatch in dispatches:
            dispatch.ready = ready
        if not hold:
            request.finish()
        return request, dispatches


def _timed(fn: Callable[..., _T], *args: Any) -> tuple[_T, int, int]:
    start = time.time_ns()
    result = fn(*args)
    return result, start, time.time_ns()
