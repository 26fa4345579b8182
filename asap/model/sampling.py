"""Choosing the first generated token from the last-position logits of a prefill."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from asap.errors import InvalidArgument
from asap.sampling_options import MAX_TOP_LOGPROBS, check_sampling


@dataclass(frozen=True, slots=True)
class FirstToken:
    """The chosen token with its log-probability and the most likely alternatives."""

    token_id: int
    logprob: float
    """``log_softmax(logits)[token_id]`` of the untempered distribution."""
    top_logprobs: tuple[tuple[int, float], ...]
    """The k most likely (token_id, logprob) pairs, most likely first."""


def first_token(
    logits: torch.Tensor, *, temperature: float = 0.0, seed: int | None = None, top_logprobs: int = 0
) -> FirstToken:
    """Pick a token from logits [V].

    Greedy (argmax) when ``temperature`` is 0; otherwise a draw from ``softmax(logits / temperature)``
    using a ``torch.Generator`` seeded with ``seed`` (the same seed always gives the same token; without a
    seed the draw is non-deterministic). Log-probabilities are those of the untempered distribution.
    Raises ``InvalidArgument`` for a negative or non-finite temperature, logits that are not 1-D, or
    ``top_logprobs`` outside [0, min(V, 20)].
    """
    if logits.ndim != 1 or logits.numel() == 0:
        raise InvalidArgument(f"logits must be a non-empty 1-D tensor [V], got shape {tuple(logits.shape)}")
    vocab = logits.numel()
    check_sampling(temperature, top_logprobs)
    limit = min(vocab, MAX_TOP_LOGPROBS)
    if top_logprobs > limit:
        raise InvalidArgument(
            f"top_logprobs must be in [0, {limit}] (vocabulary {vocab}), got {top_logprobs}"
        )
    logits = logits.detach().to(device="cpu", dtype=torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)  # [V]
    if temperature == 0.0:
        token = int(torch.argmax(logits))
    else:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
        probs = torch.softmax(logits / temperature, dim=-1)  # [V]
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if top_logprobs:
        values, ids = torch.topk(logprobs, top_logprobs)  # descending
        top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return FirstToken(token_id=token, logprob=float(logprobs[token]), top_logprobs=top)
