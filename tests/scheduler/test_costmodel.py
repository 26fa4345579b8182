"""AttentionCostModel: predictions and the non-negative least-squares fit."""

from __future__ import annotations

import numpy as np
import pytest

from asap.errors import InvalidArgument
from scheduler_svc.costmodel import AttentionCostModel


def _synthetic(
    truth: AttentionCostModel, seed: int, count: int = 60, noise: float = 0.0
) -> list[tuple[list[int], float]]:
    rng = np.random.default_rng(seed)
    samples: list[tuple[list[int], float]] = []
    for _ in range(count):
        lengths = [int(n) for n in np.clip(rng.lognormal(6.0, 1.0, size=rng.integers(1, 9)), 1, 16384)]
        ms = truth.batch_ms(lengths) * (1.0 + noise * rng.standard_normal())
        samples.append((lengths, max(ms, 0.0)))
    return samples


def test_predictions_follow_the_formula() -> None:
    cost = AttentionCostModel(a_ms=0.5, b_ms=0.01, c_ms=3.0)
    assert cost.prompt_ms(0) == 0.0
    assert cost.prompt_ms(10) == pytest.approx(0.5 * 10 + 0.01 * 100)
    assert cost.batch_ms([10, 20]) == pytest.approx(3.0 + cost.prompt_ms(10) + cost.prompt_ms(20))
    assert cost.batch_ms([]) == 3.0


def test_defaults_make_the_quadratic_term_dominate_long_prompts() -> None:
    cost = AttentionCostModel()
    long = 4 * int(cost.a_ms / cost.b_ms)
    assert cost.b_ms * long * long > 3 * cost.a_ms * long
    # One long prompt outweighs many short ones of the same total length.
    assert cost.prompt_ms(long) > 3 * sum(cost.prompt_ms(long // 64) for _ in range(64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_coefficients(seed: int) -> None:
    truth = AttentionCostModel(a_ms=0.03, b_ms=2e-5, c_ms=4.0)
    fitted = AttentionCostModel.fit(_synthetic(truth, seed, noise=0.01))
    assert fitted.a_ms == pytest.approx(truth.a_ms, rel=0.1)
    assert fitted.b_ms == pytest.approx(truth.b_ms, rel=0.05)
    assert fitted.c_ms == pytest.approx(truth.c_ms, abs=2.0)  # small beside the noise of long batches
    for lengths in ([2000, 50], [8000], [500] * 8):
        assert fitted.batch_ms(lengths) == pytest.approx(truth.batch_ms(lengths), rel=0.05)


def test_fit_is_exact_on_noiseless_data() -> None:
    truth = AttentionCostModel(a_ms=0.1, b_ms=1e-4, c_ms=2.0)
    fitted = AttentionCostModel.fit(_synthetic(truth, seed=7, count=10))
    assert fitted.a_ms == pytest.approx(truth.a_ms, rel=1e-6)
    assert fitted.b_ms == pytest.approx(truth.b_ms, rel=1e-6)
    assert fitted.c_ms == pytest.approx(truth.c_ms, rel=1e-6)


def test_fit_keeps_coefficients_non_negative() -> None:
    # Time falls with size: unconstrained least squares would give a negative slope.
    samples = [([100], 10.0), ([200], 9.0), ([400], 8.0), ([800], 7.0)]
    fitted = AttentionCostModel.fit(samples)
    assert min(fitted.a_ms, fitted.b_ms, fitted.c_ms) >= 0.0
    assert fitted.c_ms == pytest.approx(8.5)  # the best non-negative fit is the mean as a constant


def test_fit_needs_three_samples() -> None:
    with pytest.raises(InvalidArgument, match="3 samples"):
        AttentionCostModel.fit([([10], 1.0), ([20], 2.0)])


@pytest.mark.parametrize(
    "samples",
    [
        [([10], 1.0), ([20], -2.0), ([30], 3.0)],
        [([10], 1.0), ([-20], 2.0), ([30], 3.0)],
        [([10], 1.0), ([20], float("nan")), ([30], 3.0)],
    ],
)
def test_fit_rejects_bad_samples(samples: list[tuple[list[int], float]]) -> None:
    with pytest.raises(InvalidArgument):
        AttentionCostModel.fit(samples)


@pytest.mark.parametrize("field", ["a_ms", "b_ms", "c_ms"])
def test_negative_coefficient_is_rejected(field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        AttentionCostModel(**{field: -1.0})


def test_negative_length_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        AttentionCostModel().prompt_ms(-1)
