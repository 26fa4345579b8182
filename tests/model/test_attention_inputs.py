"""AttentionPart input validation: bad prompts raise InvalidArgument naming the offending values."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from asap.errors import InvalidArgument
from asap.model.attention_part import AttentionPart
from asap.model.reference import load_model
from tests.model.conftest import TinyModel


@pytest.fixture(scope="module")
def attention(tiny_model_factory: Callable[[str], TinyModel]) -> AttentionPart:
    part, _ = load_model(tiny_model_factory("qwen3-k4-nonorm-window").path)
    return part


def _raises(attention: AttentionPart, prompt: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as info:
        attention.validate_prompt(prompt)  # type: ignore[arg-type]
    assert type(info.value) is InvalidArgument
    with pytest.raises(InvalidArgument, match=match):
        attention.forward_steps([[1, 2], prompt])  # type: ignore[list-item]


def test_valid_prompts_become_int64_vectors(attention: AttentionPart) -> None:
    for prompt in ([3, 1, 4], torch.tensor([3, 1, 4], dtype=torch.int32), (3, 1, 4)):
        ids = attention.validate_prompt(prompt)
        assert ids.dtype == torch.int64 and ids.tolist() == [3, 1, 4]
    vocab, limit = attention.config.vocab_size, attention.config.max_position_embeddings
    assert attention.validate_prompt([vocab - 1] * limit).numel() == limit


def test_empty_prompt(attention: AttentionPart) -> None:
    _raises(attention, [], "empty")
    _raises(attention, torch.tensor([], dtype=torch.int64), "empty")


@pytest.mark.parametrize("bad", [-1, 160, 10_000])
def test_token_outside_the_vocabulary(attention: AttentionPart, bad: int) -> None:
    assert attention.config.vocab_size == 160
    _raises(attention, [5, 6, bad, 7], f"token id {bad} at position 2 .*\\[0, 160\\)")


def test_prompt_longer_than_max_positions(attention: AttentionPart) -> None:
    limit = attention.config.max_position_embeddings
    _raises(attention, [1] * (limit + 1), f"{limit + 1} tokens.*max_position_embeddings={limit}")


@pytest.mark.parametrize("prompt", [[1.5, 2.0], torch.tensor([[1, 2]]), [True, False], ["a"], 2**70])
def test_malformed_prompt(attention: AttentionPart, prompt: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        attention.validate_prompt(prompt)  # type: ignore[arg-type]
    assert type(info.value) is InvalidArgument


def test_empty_batch(attention: AttentionPart) -> None:
    with pytest.raises(InvalidArgument, match="no prompts"):
        attention.forward_steps([])


def test_wrong_routed_output_shape(attention: AttentionPart) -> None:
    steps = attention.forward_steps([[1, 2, 3]])
    request = next(steps)
    with pytest.raises(InvalidArgument, match=f"layer {request.layer}"):
        steps.send(torch.zeros(2, attention.config.hidden_size))
