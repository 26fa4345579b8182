"""Emulated attention and expert parts: the real parts' interfaces, no values, modelled time.

``EmulatedAttentionPart`` and ``EmulatedExpertPart`` stand in for ``asap.model.AttentionPart`` and
``ExpertPart`` under ``--compute emulated:DEVICE``. They need only a ``ModelConfig`` (config.json alone
is enough): every op sleeps for the time ``costs`` gives for the device profile, hidden states are
``meta`` tensors (shape and dtype, no storage), and routing is real but random: top-k expert ids drawn
without replacement from a Zipf-like popularity over experts (``skew`` = 0: uniform; ``routing``), with
a different hot set per layer, the same for every attention rank. Logits are zeros, so the first token of
every emulated prompt is 0. Results are labelled by ``emulated = True`` on both parts.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Generator, Sequence
from typing import cast

import numpy as np
import torch

from asap.dtypes import dtype_bytes
from asap.emulation import costs
from asap.emulation.clock import Sleeper
from asap.emulation.profiles import DeviceProfile
from asap.emulation.routing import RandomRouter
from asap.errors import InvalidArgument
from asap.model.attention_part import AttentionPart, MoERequest, SteppedPart
from asap.model.config import ModelConfig
from asap.model.expert_part import ExpertPart
from asap.model.hosted import HostedCounts, HostedIds
from asap.model.kvcache import ChunkCache, check_caches
from asap.model.meta import meta_empty


class EmulatedAttentionPart(SteppedPart[ChunkCache]):
    """An ``AttentionModel`` (the ``AttentionPart`` interface) with modelled time: sleeps per layer, yields
    meta hidden states."""

    emulated = True

    def __init__(
        self,
        config: ModelConfig,
        profile: DeviceProfile,
        *,
        seed: int = 0,
        skew: float = 0.0,
        dtype: torch.dtype = torch.bfloat16,
        sleeper: Sleeper | None = None,
        pool_rows: int = 4096,
    ) -> None:
        self.config = config
        self.profile = profile
        self.dtype = dtype
        self.device = torch.device("meta")
        self._bytes = dtype_bytes(dtype)
        self.router = RandomRouter(config, seed=seed, skew=skew, pool_rows=pool_rows)
        self.sleeper = sleeper if sleeper is not None else Sleeper()
        self._calls = itertools.count()
        self._calls_lock = threading.Lock()
        self._zero_logits = torch.zeros((1, config.vocab_size), dtype=torch.float32)  # [1, V]

    def validate_prompt(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The real part's check (it reads only ``config``): int64 1-D CPU tensor or ``InvalidArgument``."""
        return AttentionPart.validate_prompt(cast(AttentionPart, self), token_ids)

    def layer_s(
        self, layer: int, prompt_lengths: Sequence[int], prefix_lengths: Sequence[int] | None = None
    ) -> float:
        """Modelled time (s) of one layer's attention part for prompts (chunks after ``prefix_lengths``)."""
        return costs.attention_layer_s(
            self.config, layer, prompt_lengths, self.profile, self._bytes, prefix_lengths
        )

    def modeled_s(self, prompt_lengths: Sequence[int]) -> float:
        """Modelled time (s) this part sleeps for one forward pass (every layer plus the LM head)."""
        layers = sum(self.layer_s(i, prompt_lengths) for i in range(self.config.num_layers))
        return layers + costs.lm_head_s(len(prompt_lengths), self.config, self.profile, self._bytes)

    def inputs_ready(self) -> None:
        """The caller (on the thread that drives ``forward_steps``) has the experts' results of the last
        MoE layer and starts combining them: the next layer's modelled time counts from now. A device
        runs the combine and the layer's kernels while the host launches them, so the host work of the
        combine runs inside that time rather than before it; the layer's full modelled time is still
        charged from here."""
        _begin(self.sleeper)

    def forward_steps(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        *,
        caches: Sequence[ChunkCache | None] | None = None,
    ) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
        """As ``AttentionPart.forward_steps``: validates now; the generator sleeps each layer's modelled time.

        Yields one ``MoERequest`` per MoE layer with ``hidden`` a meta [T, H] tensor and real random
        ``topk_ids`` [T, K] / ``topk_weights`` [T, K]; expects back any [T, H] tensor (meta is fine).
        ``caches[i]`` (chunked prefill) makes prompt i a chunk after ``caches[i].length`` cached tokens: its
        attention is charged for the prefix too, and meta K/V are staged and committed so the cache's
        length advances as with the real part. Returns zero logits [B, V] float32: a read-only expanded
        view of one shared zero row (clone before writing), so a large vocabulary costs nothing per call.
        """
        if len(prompts) == 0:
            raise InvalidArgument("batch has no prompts")
        lengths = [int(self.validate_prompt(p).numel()) for p in prompts]
        slots: list[ChunkCache | None] = [None] * len(lengths) if caches is None else list(caches)
        check_caches(self.config, lengths, slots, self.dtype, self.device)
        with self._calls_lock:
            call = next(self._calls)
        return self._steps(lengths, slots, call)

    def _steps(
        self, lengths: list[int], caches: list[ChunkCache | None], call: int
    ) -> Generator[MoERequest, torch.Tensor, torch.Tensor]:
        cfg, tokens = self.config, sum(lengths)
        prefixes = [0 if c is None else c.length for c in caches]
        g = torch.Generator().manual_seed(hash((self.router.seed, call)) & 0x7FFF_FFFF_FFFF_FFFF)
        cost: dict[bool, float] = {}  # is-MoE -> seconds: the cost depends only on the layer kind
        for layer, is_moe in enumerate(cfg.moe_layers):
            # the layer's host work below runs inside its modelled time; after a MoE layer that time may
            # have started earlier, when the caller took the experts' results (``inputs_ready``)
            _begin(self.sleeper, keep_pending=layer > 0 and cfg.moe_layers[layer - 1])
            if is_moe not in cost:
                cost[is_moe] = self.layer_s(layer, lengths, prefixes)
            for n, cache in zip(lengths, caches, strict=True):
                if cache is not None:
                    heads, key_width, value_width = cfg.kv_cache_layout
                    k = torch.empty((heads, n, key_width), dtype=self.dtype, device="meta")
                    v = torch.empty((heads, n, value_width), dtype=self.dtype, device="meta")
                    cache.stage(layer, k, v)
            if is_moe:
                ids, weights = self.router.route(layer, tokens, g)  # [T, K] each
                hidden = meta_empty((tokens, cfg.hidden_size), self.dtype)  # [T, H]
            if not is_moe:
                self.sleeper.sleep(cost[is_moe])
                continue
            # The MoE layer's modelled time ends in ``finish``: the caller splits and fills the dispatches
            # inside it and sends them once it is over (``MoERequest.rest``).
            request = MoERequest(
                layer=layer,
                hidden=hidden,
                topk_ids=ids,
                topk_weights=weights,
                rest=functools.partial(self.sleeper.sleep, cost[is_moe]),
            )
            routed = yield request
            request.finish()  # (a caller that sent the dispatches without it: the time is charged still)
            if not isinstance(routed, torch.Tensor) or routed.shape != hidden.shape:
                shape = tuple(routed.shape) if isinstance(routed, torch.Tensor) else type(routed).__name__
                raise InvalidArgument(
                    f"layer {layer}: routed-expert output {shape} does not match hidden {tuple(hidden.shape)}"
                )
        self.sleeper.sleep(costs.lm_head_s(len(lengths), cfg, self.profile, self._bytes))
        for n, cache in zip(lengths, caches, strict=True):
            if cache is not None:
                cache.commit(n)
        return self._zero_logits.expand(len(lengths), cfg.vocab_size)  # [B, V]


PER_LAYER_CALL_OVERHEAD_S = 150e-6
"""Extra time of an expert call through a per-layer module instead of the layer-agnostic graph replay:
measured on an H200 (benchmarks/results/gpu_experts_h200.json, 32-expert shard, 64-256 tokens: ~400 us
per-layer eager vs ~250 us graph replay), scaled with the profile's launch cost."""
H200_LAUNCH_US = 40.0


class EmulatedExpertPart(ExpertPart):
    """``ExpertPart`` with meta weight stacks (no storage): same validation, modelled time, meta output."""

    emulated = True

    def __init__(
        self,
        config: ModelConfig,
        hosted: Sequence[int],
        profile: DeviceProfile,
        *,
        dtype: torch.dtype = torch.bfloat16,
        sleeper: Sleeper | None = None,
    ) -> None:
        n_moe, n_local = len(config.moe_layer_ids), len(set(hosted))
        h, i = config.hidden_size, config.expert_intermediate_size
        super().__init__(
            config,
            hosted,
            gate_up=torch.empty((n_moe, n_local, 2 * i, h), dtype=dtype, device="meta"),
            down=torch.empty((n_moe, n_local, h, i), dtype=dtype, device="meta"),
        )
        self.profile = profile
        self._bytes = dtype_bytes(dtype)
        self.sleeper = sleeper if sleeper is not None else Sleeper()
        self._hosted_index = np.asarray(self.hosted, dtype=np.int64)
        self._foreign = np.ones(config.num_experts, dtype=bool)  # [E] experts hosted elsewhere
        self._foreign[self._hosted_index] = False
        self._hosted_ids = HostedIds(self.hosted, config.num_experts)
        self._call_s: dict[tuple[int, int], float] = {}
        """Modelled seconds per (rows, experts with rows): the same call's kernels, built once."""
        self._ready = threading.local()

    def inputs_ready(self, at_s: float | None) -> None:
        """The rank took the next call's rows at ``at_s`` (``time.perf_counter``), on this thread: that
        ``compute`` counts its modelled time from then, as a device whose step waits on the rows' ready
        flag starts when they land while its host still reads the descriptor and checks the ids (the
        fast lane, ``expert_svc.fastlane``). The full modelled time is still charged from there, and
        host work longer than it is not hidden. ``None`` forgets it (the computation did not start)."""
        self._ready.at = at_s

    def rows_per_expert(self, expert_ids: torch.Tensor) -> list[int]:
        """Rows routed to each hosted expert (in ``hosted`` order) by ids [N, K] (-1 slots skipped)."""
        counts = self._counts(_int64_ids(expert_ids))
        return [int(c) for c in counts[self._hosted_index].tolist()]

    def _counts(self, ids: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
        """Rows per global expert [E] of flat int64 ids (-1 skipped); numpy: a few µs, not tens."""
        return np.bincount(ids[ids >= 0], minlength=self.config.num_experts)

    def call_s(self, expert_ids: torch.Tensor) -> float:
        """Modelled time (s) of ``compute`` for these ids."""
        return costs.expert_call_s(self.rows_per_expert(expert_ids), self.config, self.profile, self._bytes)

    def checked_rows_per_expert(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> list[int]:
        """``rows_per_expert`` after the real part's checks of ``compute`` (the same ``InvalidArgument``s):
        one numpy pass over the ids validates them and counts the rows per expert (the real part's torch
        checks cost more than the modelled call's bookkeeping)."""
        return [int(c) for c in self._checked_counts(hidden, expert_ids, weights).tolist()]

    def _checked_counts(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> np.ndarray:  # type: ignore[type-arg]
        """``checked_rows_per_expert`` as a numpy array (no Python list of every hosted expert)."""
        self._check_shapes(hidden, expert_ids, weights)
        e = self.config.num_experts
        if expert_ids.dtype is torch.int32 and expert_ids.device.type == "cpu" and expert_ids.numel():
            # What the planes deliver, in one pass (as ``ExpertExecutor.validate``): ``id + 1`` (intp)
            # read as unsigned puts -1 at 0 and every id outside [-1, E) above E; counted per slot, every
            # id is hosted here when the hosted experts' rows are all the rows that are not -1.
            shifted = expert_ids.numpy().astype(np.intp).ravel()
            shifted += 1
            if int(np.maximum.reduce(shifted.view(np.uintp))) <= e:
                slots = np.bincount(shifted, minlength=e + 1)
                hosted = slots[1:].take(self._hosted_index)
                if int(np.add.reduce(hosted)) == shifted.size - int(slots[0]):
                    return hosted
        ids = _int64_ids(expert_ids)
        low = int(ids.min()) if ids.size else 0
        if ids.size and (low < -1 or int(ids.max()) >= self.config.num_experts):
            self._reject(ids)
        # no -1 slot (the usual case): count without masking them out first
        counts = np.bincount(ids, minlength=self.config.num_experts) if low >= 0 else self._counts(ids)
        if counts[self._foreign].any():
            self._reject(ids)
        return counts[self._hosted_index]

    def _checked_totals(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[int, int]:
        """(rows summed over the hosted experts, hosted experts with rows) after the checks of
        ``_checked_counts`` (the same ``InvalidArgument``s): all a modelled call's time depends on. CPU
        int32 ids of a contiguous block (what the planes deliver to a placement's rank) take
        ``HostedIds``' two reductions and one count of the used slots; anything else the counts."""
        if expert_ids.dtype is torch.int32 and expert_ids.is_cpu:
            ids = expert_ids.numpy()
            if self._hosted_ids.all_hosted(ids):
                self._check_shapes(hidden, expert_ids, weights)
                return self._hosted_ids.totals(ids)
        counts = self._checked_counts(hidden, expert_ids, weights)
        return int(counts.sum()), int(np.count_nonzero(counts))

    def _modelled_call_s(self, totals: tuple[int, int]) -> float:
        """``costs.expert_call_s`` of a call from its two totals (``_checked_totals``), cached per pair:
        2-5 µs a layer against ~60-100 µs for the kernels from a list of 128 counts under load."""
        seconds = self._call_s.get(totals)
        if seconds is None:
            seconds = costs.expert_call_totals_s(*totals, self.config, self.profile, self._bytes)
            if len(self._call_s) < 65536:
                self._call_s[totals] = seconds
        return seconds

    def compute(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Validate as ``ExpertPart.compute``, sleep the modelled time, return a meta [N, H] tensor.

        The modelled time counts from the call's start (``Sleeper.begin``): the validation and the row
        counts run inside it. One numpy pass over the ids both validates them (the real part's rules and
        messages) and counts the rows per expert."""
        return self._modelled_compute(layer, hidden, expert_ids, weights, None)

    def compute_counted(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        counted: HostedCounts,
    ) -> torch.Tensor:
        """``compute`` of ids the rank checked and counted (``ExpertExecutor.check``): the shapes are
        checked, the ids not again; the modelled time is that of the same totals (so the same time)."""
        return self._modelled_compute(layer, hidden, expert_ids, weights, counted)

    def _modelled_compute(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        counted: HostedCounts | None,
    ) -> torch.Tensor:
        at = getattr(self._ready, "at", None)
        self._ready.at = None
        _begin(self.sleeper, at=at)
        self._slot(layer)
        if counted is None:
            totals = self._checked_totals(hidden, expert_ids, weights)
        else:
            self._check_shapes(hidden, expert_ids, weights)
            per_expert, used = counted  # nonzero exactly for the experts with rows (``HostedCounts``)
            totals = (used, len(per_expert.nonzero()[0]) if used else 0)
        extra = (
            0.0
            if self.layer_agnostic
            else PER_LAYER_CALL_OVERHEAD_S * self.profile.launch_us / H200_LAUNCH_US
        )
        self.sleeper.sleep(self._modelled_call_s(totals) + extra)
        return meta_empty((int(hidden.shape[0]), self.config.hidden_size), self.dtype)

    def _reject(self, ids: np.ndarray) -> None:  # type: ignore[type-arg]
        """The real part's error for ids that are out of range or hosted elsewhere."""
        e = self.config.num_experts
        bad = (ids < -1) | (ids >= e)
        inside = (ids >= 0) & (ids < e)
        bad[inside] = self._foreign[ids[inside]]
        wrong = sorted({int(x) for x in ids[bad].tolist()})
        raise InvalidArgument(f"expert ids {wrong} are not hosted here (hosted: {list(self.hosted)})")


def _begin(sleeper: Sleeper, *, keep_pending: bool = False, at: float | None = None) -> None:
    """``sleeper.begin()``; a duck-typed sleeper with ``sleep`` alone (a test's) counts from ``sleep``."""
    begin = getattr(sleeper, "begin", None)
    if begin is None:
        return
    if at is not None:
        begin(at=at)
    elif keep_pending:
        begin(keep_pending=True)
    else:
        begin()


def _int64_ids(expert_ids: torch.Tensor) -> np.ndarray:  # type: ignore[type-arg]
    """Flat int64 numpy ids of a CPU (or any) integer tensor [N, K]. A CPU int64 / int32 tensor (what
    the planes deliver) is read in place through numpy (~5 µs, against ~15 µs for the torch calls)."""
    if expert_ids.device.type == "cpu" and expert_ids.dtype in (torch.int64, torch.int32):
        return expert_ids.detach().numpy().reshape(-1).astype(np.int64, copy=False)
    return expert_ids.detach().to(device="cpu", dtype=torch.int64).reshape(-1).numpy()
