"""``sample_all``: draws from all-zero logits (emulated ranks) are reused, and equal fresh ones."""

from __future__ import annotations

import torch

from asap.model.sampling import first_token
from attention_svc import batch
from attention_svc.batch import PromptSpec, sample_all


def _prompt(**options: object) -> PromptSpec:
    return PromptSpec("r", torch.tensor([1, 2]), **options)  # type: ignore[arg-type]


def _fresh(row: torch.Tensor, p: PromptSpec) -> object:
    return first_token(row, temperature=p.temperature, seed=p.seed, top_logprobs=p.top_logprobs)


def test_zero_logits_draws_are_reused_and_identical() -> None:
    batch._ZERO_ROWS.clear()
    logits = torch.zeros((1, 1000), dtype=torch.float32).expand(2, 1000)  # the emulated part's shape
    prompts = [_prompt(), _prompt(temperature=0.8, seed=7, top_logprobs=3)]
    first = sample_all(logits, prompts)
    assert first == [_fresh(logits[0], prompts[0]), _fresh(logits[1], prompts[1])]
    assert len(batch._ZERO_ROWS) == 2
    assert sample_all(logits, prompts) == first  # from the memo
    assert len(batch._ZERO_ROWS) == 2


def test_unseeded_draws_and_other_logits_are_always_computed() -> None:
    batch._ZERO_ROWS.clear()
    zeros = torch.zeros((1, 50))
    sample_all(zeros, [_prompt(temperature=1.0)])  # not deterministic: never memoised
    negative = -torch.zeros((1, 50))  # -0.0: not the all-clear bit pattern
    assert sample_all(negative, [_prompt()]) == [_fresh(negative[0], _prompt())]
    g = torch.Generator().manual_seed(0)
    real = torch.randn((2, 50), generator=g)
    p = _prompt(top_logprobs=2)
    assert sample_all(real, [p, p]) == [_fresh(real[0], p), _fresh(real[1], p)]
    half = torch.zeros((1, 50), dtype=torch.bfloat16)
    assert sample_all(half, [_prompt()]) == [_fresh(half[0], _prompt())]
    assert batch._ZERO_ROWS == {}


def test_chunks_with_more_to_come_sample_nothing() -> None:
    assert sample_all(torch.zeros((1, 10)), [_prompt(more_chunks=True)]) == [None]
