"""The expert knee: the min-size batching threshold, measured or modelled (``asap calibrate``).

Not to be confused with the scheduler's fit of its attention cost model at start-up (also called
calibration there): this module looks only at the expert routine.

The expert routine of one rank is timed (or, for emulated compute, modelled) for one MoE layer over a
range of batch sizes. Its throughput grows with the batch while the call is bound by kernel launches and
weight reads, then levels off once it is compute-bound; the *knee* is the smallest measured batch whose
throughput reaches ``plateau_fraction`` of the best one. The scheduler holds batches until they reach it
(``--min-batch-tokens``).

Batch sizes are prompt tokens of one attention rank's batch at one layer. Each token chooses ``top_k``
experts uniformly at random over all ``E`` experts; the calibrated rank hosts its contiguous share (that
of rank 0 of ``num_ranks``) and receives only the slots that chose its experts, as ``split_by_rank`` sends
them, so a rank hosting ``E / M`` experts gets about ``tokens * top_k / M`` rows.

Timing does not depend on weight values, so the real backend uses random weights of the model's shape:
config.json alone is enough for both backends, and only one MoE layer is allocated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from asap.dtypes import dtype_bytes
from asap.emulation import costs
from asap.emulation.profiles import DeviceProfile, parse_compute
from asap.errors import InvalidArgument
from asap.model.config import ModelConfig, load_config
from asap.model.expert_part import ExpertPart
from asap.model.placement import ExpertPlacement
from asap.model.resolve import resolve_model

DEFAULT_TOKEN_COUNTS: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""Batch sizes of a device calibration (the range of the H200 calibration file)."""
CPU_TOKEN_COUNTS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Batch sizes of a CPU calibration: CPU throughput levels off early, and the run stays short."""
DEFAULT_PLATEAU_FRACTION = 0.8


@dataclass(frozen=True, slots=True)
class KneeResult:
    """The measured (or modelled) expert curve of one rank and the knee picked on it."""

    knee_tokens: int
    """Smallest batch (tokens) whose throughput reaches ``plateau_fraction`` of the best measured."""
    curve: dict[int, float]
    """Batch tokens -> seconds of one expert call for one layer on the calibrated rank."""
    backend: str
    """``torch:cpu``, ``torch:cuda`` or ``emulated:PROFILE`` (emulated results are labelled as such)."""
    flops_per_token: float
    """Expert FLOPs one batch token costs the calibrated rank (for TFLOP/s)."""
    plateau_fraction: float = DEFAULT_PLATEAU_FRACTION

    def tflops(self) -> dict[int, float]:
        """Batch tokens -> achieved TFLOP/s of the calibrated rank."""
        return {n: n * self.flops_per_token / s / 1e12 for n, s in self.curve.items()}


def expert_flops_per_token(config: ModelConfig, num_local: int | None = None) -> float:
    """Routed-expert FLOPs per token for a rank hosting ``num_local`` of the experts (default: all):
    gate, up and down GEMMs, 2 FLOPs per multiply-add, ``top_k`` experts, the rank's share of them."""
    local = config.num_experts if num_local is None else num_local
    full = 6.0 * config.hidden_size * config.expert_intermediate_size * config.top_k
    return full * local / config.num_experts


def expert_knee(
    times_by_tokens: Mapping[int, float],
    flops_per_token: float,
    plateau_fraction: float = DEFAULT_PLATEAU_FRACTION,
) -> int:
    """Smallest token count whose throughput (``tokens * flops_per_token / time``) reaches
    ``plateau_fraction`` of the best throughput on the curve. ``flops_per_token`` scales every point alike,
    so it does not move the knee; it is there so callers think in TFLOP/s."""
    if not times_by_tokens:
        raise InvalidArgument("expert_knee needs at least one measured point")
    if not 0 < plateau_fraction <= 1:
        raise InvalidArgument(f"plateau_fraction must be in (0, 1], got {plateau_fraction}")
    if flops_per_token <= 0:
        raise InvalidArgument(f"flops_per_token must be positive, got {flops_per_token}")
    bad = {n: s for n, s in times_by_tokens.items() if n <= 0 or not s > 0}
    if bad:
        raise InvalidArgument(f"token counts and times must be positive, got {bad}")
    throughput = {n: n * flops_per_token / s for n, s in sorted(times_by_tokens.items())}
    target = plateau_fraction * max(throughput.values())
    return next(n for n, rate in throughput.items() if rate >= target)


def random_routing(
    config: ModelConfig, hosted: Sequence[int], tokens: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, K] and weights [N, K] float32 of the rows one rank receives from a batch of ``tokens``.

    Each token draws ``top_k`` distinct experts uniformly over all experts; slots outside ``hosted`` are
    -1, and tokens with no hosted slot are dropped (they are not sent to this rank).
    """
    e, k = config.num_experts, config.top_k
    ids = torch.rand((tokens, e), generator=g).argsort(dim=1)[:, :k]  # [T, K] distinct per row
    is_hosted = torch.zeros(e, dtype=torch.bool)
    is_hosted[list(hosted)] = True
    mask = is_hosted[ids]  # [T, K]
    ids = torch.where(mask, ids, -1)[mask.any(dim=1)]  # [N, K]
    weights = torch.full(ids.shape, 1.0 / k, dtype=torch.float32)  # [N, K]
    return ids, weights


def measure_expert_curve(
    part: ExpertPart,
    layer: int,
    token_counts: Sequence[int],
    repeats: int = 3,
    *,
    warmup: int = 1,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[int, float]:
    """Fastest of ``repeats`` timings (s) of ``part.compute(layer, hidden, ids, weights)`` per batch size (module docstring).

    The fastest run is kept because noise (other processes, page faults, frequency changes) only ever adds
    time; the routine's own cost is the floor. The device is synchronised before each clock reading when
    the part lives on CUDA, so the time is the device time of the call, not its launch time.
    """
    if repeats < 1 or warmup < 0:
        raise InvalidArgument(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    _check_counts(token_counts)
    g = torch.Generator().manual_seed(seed)
    curve: dict[int, float] = {}
    for tokens in sorted(token_counts):
        ids, weights = random_routing(part.config, part.hosted, tokens, g)
        hidden = torch.randn((ids.shape[0], part.config.hidden_size), generator=g).to(part.dtype)  # [N, H]
        hidden, ids, weights = (t.to(part.device) for t in (hidden, ids, weights))
        times = []
        for i in range(warmup + repeats):
            _synchronize(part.device)
            start = clock()
            part.compute(layer, hidden, ids, weights)
            _synchronize(part.device)
            if i >= warmup:
                times.append(clock() - start)
        curve[tokens] = min(times)
    return curve


def emulated_expert_curve(
    config: ModelConfig,
    profile: DeviceProfile,
    num_ranks: int,
    token_counts: Sequence[int],
    dtype: torch.dtype = torch.bfloat16,
) -> dict[int, float]:
    """Modelled seconds (``costs.expert_call_s``) of rank 0's expert call per batch size: the batch's
    ``tokens * top_k`` rows spread evenly over all experts, of which the rank hosts its share."""
    _check_counts(token_counts)
    local = len(ExpertPlacement(config.num_experts, num_ranks).experts_of(0))
    curve: dict[int, float] = {}
    for tokens in sorted(token_counts):
        rows = round(tokens * config.top_k * local / config.num_experts)
        base, extra = divmod(rows, local)
        per_expert = [base + (1 if i < extra else 0) for i in range(local)]
        curve[tokens] = costs.expert_call_s(per_expert, config, profile, dtype_bytes(dtype))
    return curve


def one_layer_part(
    config: ModelConfig,
    hosted: Sequence[int],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    seed: int = 0,
) -> tuple[ExpertPart, int]:
    """An ``ExpertPart`` of random weights for ``hosted`` experts of a single MoE layer, and that layer."""
    one = dataclasses.replace(config, num_layers=1, moe_layers=(True,))
    h, i, n = config.hidden_size, config.expert_intermediate_size, len(hosted)
    g = torch.Generator(device=device).manual_seed(seed)
    scale_in, scale_inter = h**-0.5, i**-0.5
    gate_up = torch.randn((1, n, 2 * i, h), generator=g, device=device, dtype=dtype) * scale_in
    down = torch.randn((1, n, h, i), generator=g, device=device, dtype=dtype) * scale_inter
    return ExpertPart(one, hosted, gate_up=gate_up, down=down), 0


def measure_knee(
    model_dir: str,
    compute: str = "torch",
    num_ranks: int = 1,
    token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 3,
    plateau_fraction: float = DEFAULT_PLATEAU_FRACTION,
) -> KneeResult:
    """Measure (``torch``) or model (``emulated:DEVICE``) rank 0's expert curve and pick its knee.

    ``model_dir``: a checkpoint directory, a directory holding only config.json, or ``tiny``.
    ``device``/``dtype`` apply to ``torch``; ``dtype`` sets the element size for emulated compute.
    """
    config = load_config(resolve_model(model_dir))
    kind, profile = parse_compute(compute)
    hosted = ExpertPlacement(config.num_experts, num_ranks).experts_of(0)
    flops = expert_flops_per_token(config, len(hosted))
    if profile is not None:
        curve = emulated_expert_curve(config, profile, num_ranks, token_counts, dtype)
        backend = f"{kind}:{profile.name}"
    else:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument("--device cuda requested but torch sees no CUDA device")
        part, layer = one_layer_part(config, hosted, dtype=dtype, device=device)
        curve = measure_expert_curve(part, layer, token_counts, repeats)
        backend = f"torch:{part.device.type}"
    knee = expert_knee(curve, flops, plateau_fraction)
    return KneeResult(knee, curve, backend, flops, plateau_fraction)


def _check_counts(token_counts: Sequence[int]) -> None:
    if not token_counts or any(n <= 0 for n in token_counts):
        raise InvalidArgument(
            f"token counts must be a non-empty list of positive ints, got {list(token_counts)}"
        )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
