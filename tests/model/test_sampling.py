"""first_token: greedy, seeded sampling, log-probabilities, argument checks."""

from __future__ import annotations

import pytest
import torch

from asap.errors import InvalidArgument
from asap.model.sampling import FirstToken, first_token


def _logits(vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_picks_the_argmax_with_its_logprob() -> None:
    logits = _logits()
    result = first_token(logits)
    assert isinstance(result, FirstToken)
    assert result.token_id == int(logits.argmax())
    assert result.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[result.token_id]), abs=1e-6)
    assert result.logprob < 0
    assert result.top_logprobs == ()


def test_top_logprobs_sorted_and_consistent_with_log_softmax() -> None:
    logits = _logits()
    logprobs = torch.log_softmax(logits, -1)
    result = first_token(logits, top_logprobs=5)
    assert len(result.top_logprobs) == 5
    values = [v for _, v in result.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert result.top_logprobs[0][0] == result.token_id
    assert result.top_logprobs[0][1] == pytest.approx(result.logprob)
    expected = torch.topk(logprobs, 5).indices.tolist()
    assert [t for t, _ in result.top_logprobs] == expected
    for token, value in result.top_logprobs:
        assert value == pytest.approx(float(logprobs[token]), abs=1e-6)


def test_sampling_is_deterministic_for_a_seed() -> None:
    logits = torch.zeros(40)  # uniform: every draw is possible
    draws = {first_token(logits, temperature=1.0, seed=s).token_id for s in range(30)}
    assert len(draws) > 5  # it really samples
    for s in range(10):
        a = first_token(logits, temperature=1.0, seed=s)
        assert a == first_token(logits, temperature=1.0, seed=s)


def test_sampled_logprob_is_untempered() -> None:
    logits = _logits(seed=3)
    result = first_token(logits, temperature=2.5, seed=7, top_logprobs=3)
    assert result.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[result.token_id]), abs=1e-6)
    assert result.top_logprobs == first_token(logits, top_logprobs=3).top_logprobs


def test_low_temperature_sampling_follows_the_argmax() -> None:
    logits = _logits(seed=4)
    for s in range(5):
        assert first_token(logits, temperature=1e-4, seed=s).token_id == int(logits.argmax())


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([0.0, 3.0, -20.0])  # p ~ [0.047, 0.953, 0]
    draws = [first_token(logits, temperature=1.0, seed=s).token_id for s in range(200)]
    assert draws.count(2) == 0
    assert draws.count(1) > 170


def test_top_logprobs_may_cover_a_small_vocabulary() -> None:
    result = first_token(torch.tensor([1.0, 2.0, 0.5]), top_logprobs=3)
    assert [t for t, _ in result.top_logprobs] == [1, 0, 2]
    assert sum(torch.tensor([v for _, v in result.top_logprobs]).exp().tolist()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_logprobs=-1), "top_logprobs"),
        (dict(top_logprobs=21), "top_logprobs"),
        (dict(top_logprobs=51), "top_logprobs"),
    ],
)
def test_bad_arguments_raise_invalid_argument(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        first_token(_logits(), **kwargs)  # type: ignore[arg-type]
    assert type(info.value) is InvalidArgument


def test_top_logprobs_above_vocabulary_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="vocabulary 4"):
        first_token(torch.zeros(4), top_logprobs=5)


@pytest.mark.parametrize("shape", [(), (2, 3), (0,)])
def test_logits_must_be_one_dimensional(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidArgument):
        first_token(torch.zeros(shape))
