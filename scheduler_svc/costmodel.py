"""Predicted attention time of a batch: ``c + sum(a*n + b*n^2)`` over its prompts.

The linear term covers projections, routers, shared experts and dispatch of every token; the quadratic
term is causal self-attention, which dominates for long prompts. Prompts of one batch do not attend to
each other, so a batch costs the sum of its prompts plus a fixed per-batch overhead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from asap.errors import InvalidArgument

MIN_FIT_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class AttentionCostModel:
    """Attention time of prompts and batches on one attention rank, in milliseconds.

    The defaults are rough figures for the built-in tiny model on a few CPU cores (a whole forward pass,
    all layers): 2 ms per batch, 20 us per token, and a quadratic term that overtakes the linear one at
    ``a/b = 5000`` tokens. Only ratios matter for placement; measure and ``fit`` for real deployments.
    """

    a_ms: float = 0.02
    """Milliseconds per prompt token (linear work)."""
    b_ms: float = 4e-6
    """Milliseconds per squared prompt token (causal attention)."""
    c_ms: float = 2.0
    """Milliseconds per batch (launch and messaging overhead, independent of its size)."""

    def __post_init__(self) -> None:
        for name in ("a_ms", "b_ms", "c_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"cost model {name} must be finite and >= 0, got {value!r}")

    def prompt_ms(self, n: int) -> float:
        """Predicted attention time of one prompt of ``n`` tokens, without the batch overhead."""
        if n < 0:
            raise InvalidArgument(f"prompt length must be >= 0, got {n}")
        return self.a_ms * n + self.b_ms * n * n

    def batch_ms(self, lengths: Sequence[int]) -> float:
        """Predicted attention time of one batch holding prompts of the given lengths."""
        return self.c_ms + sum(self.prompt_ms(n) for n in lengths)

    @classmethod
    def fit(cls, samples: Sequence[tuple[Sequence[int], float]]) -> AttentionCostModel:
        """Least-squares fit with non-negative coefficients on ``(batch lengths, measured ms)`` samples.

        Exact non-negative least squares for three unknowns: every subset of the features is solved
        unconstrained and the best solution with no negative coefficient wins (the empty subset, all
        zeros, is always feasible). Raises ``InvalidArgument`` on fewer than three samples or bad values.
        """
        if len(samples) < MIN_FIT_SAMPLES:
            raise InvalidArgument(
                f"fitting the cost model needs >= {MIN_FIT_SAMPLES} samples, got {len(samples)}"
            )
        rows: list[tuple[float, float, float]] = []
        targets: list[float] = []
        for lengths, ms in samples:
            if any(n < 0 for n in lengths):
                raise InvalidArgument(f"prompt lengths must be >= 0, got {list(lengths)}")
            if not math.isfinite(ms) or ms < 0:
                raise InvalidArgument(f"measured time must be finite and >= 0, got {ms!r}")
            rows.append((float(sum(lengths)), float(sum(n * n for n in lengths)), 1.0))
            targets.append(ms)
        features = np.asarray(rows, dtype=np.float64)  # [S, 3]: sum n, sum n^2, 1
        y = np.asarray(targets, dtype=np.float64)  # [S]
        # Columns differ by many orders of magnitude (n^2 vs 1); scale them so lstsq stays well conditioned.
        scale = np.linalg.norm(features, axis=0)
        scale[scale == 0] = 1.0
        scaled = features / scale
        best = np.zeros(3)
        best_residual = float(y @ y)
        for size in range(1, 4):
            for columns in itertools.combinations(range(3), size):
                cols = list(columns)
                solution, *_ = np.linalg.lstsq(scaled[:, cols], y, rcond=None)
                if np.any(solution < 0):
                    continue
                coef = np.zeros(3)
                coef[cols] = solution
                residual = y - scaled @ coef
                value = float(residual @ residual)
                if value < best_residual:
                    best, best_residual = coef, value
        a, b, c = (best / scale).tolist()
        return cls(a_ms=float(a), b_ms=float(b), c_ms=float(c))
