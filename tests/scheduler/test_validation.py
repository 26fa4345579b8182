"""PromptValidator: what the scheduler's boundary accepts and what it refuses, without grpc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from asap.errors import InvalidArgument
from asap.model.config import ModelConfig, load_config
from asap.model.tokenizer import load_tokenizer
from asap.sampling_options import MAX_TOP_LOGPROBS
from asap.v1 import scheduler_pb2
from scheduler_svc.validation import PromptValidator


@pytest.fixture
def config(qwen3_dir: Path) -> ModelConfig:
    return load_config(qwen3_dir)


def _tokens(ids: list[int], temperature: float = 0.0, top_logprobs: int = 0) -> scheduler_pb2.PrefillRequest:
    request = scheduler_pb2.PrefillRequest(tokens=scheduler_pb2.TokenIds(ids=ids))
    request.sampling.temperature = temperature
    request.sampling.top_logprobs = top_logprobs
    return request


def test_token_ids_pass_through(config: ModelConfig) -> None:
    assert PromptValidator(config, None).token_ids(_tokens([1, 2, 3])) == [1, 2, 3]


def test_text_is_tokenised_when_the_model_has_a_tokenizer(qwen3_dir: Path, config: ModelConfig) -> None:
    tokenizer = load_tokenizer(qwen3_dir)
    assert tokenizer is not None
    ids = PromptValidator(config, tokenizer).token_ids(scheduler_pb2.PrefillRequest(text="hello"))
    assert ids == tokenizer.encode("hello") and ids
    with pytest.raises(InvalidArgument, match=r"no tokenizer\.json"):
        PromptValidator(config, None).token_ids(scheduler_pb2.PrefillRequest(text="hello"))


@pytest.mark.parametrize(
    ("request_factory", "match"),
    [
        (lambda c: scheduler_pb2.PrefillRequest(), "needs a prompt"),
        (lambda c: _tokens([]), "empty prompt"),
        (lambda c: _tokens([c.vocab_size]), "outside the vocabulary"),
        (lambda c: _tokens([1] * (c.max_position_embeddings + 1)), "exceeds the model's maximum"),
        (lambda c: _tokens([1], temperature=-0.5), "temperature must be a finite number >= 0"),
        (lambda c: _tokens([1], top_logprobs=MAX_TOP_LOGPROBS + 1), r"top_logprobs must be in \[0, 20\]"),
    ],
)
def test_bad_requests_are_refused_saying_why(
    config: ModelConfig, request_factory: Callable[[ModelConfig], scheduler_pb2.PrefillRequest], match: str
) -> None:
    with pytest.raises(InvalidArgument, match=match):
        PromptValidator(config, None).token_ids(request_factory(config))


def test_the_first_token_outside_the_vocabulary_is_named(config: ModelConfig) -> None:
    """The min / max pass finds that something is out of range; the message names the first bad id."""
    vocab = config.vocab_size
    validator = PromptValidator(config, None)
    assert validator.token_ids(_tokens([0, vocab - 1, 5])) == [0, vocab - 1, 5]
    with pytest.raises(InvalidArgument, match=rf"token id {vocab + 7} outside the vocabulary"):
        validator.token_ids(_tokens([1, vocab + 7, 2, vocab + 1]))
