"""Validation at the scheduler's boundary: a ``PrefillRequest`` becomes token ids or ``InvalidArgument``.

Everything behind the boundary (the core, the attention ranks) trusts what passed here.
"""

from __future__ import annotations

from asap.errors import InvalidArgument
from asap.model.config import ModelConfig
from asap.model.tokenizer import PromptTokenizer
from asap.sampling_options import check_sampling
from asap.v1 import scheduler_pb2


class PromptValidator:
    """Turns a PrefillRequest into token ids, or raises ``InvalidArgument`` saying what is wrong."""

    def __init__(self, config: ModelConfig, tokenizer: PromptTokenizer | None) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def token_ids(self, request: scheduler_pb2.PrefillRequest) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "text":
            if self.tokenizer is None:
                raise InvalidArgument("this model has no tokenizer.json: send token ids instead of text")
            if not request.text:
                raise InvalidArgument("empty prompt")
            ids = self.tokenizer.encode(request.text)
        elif which == "tokens":
            ids = list(request.tokens.ids)
        else:
            raise InvalidArgument("a request needs a prompt: tokens or text")
        if not ids:
            raise InvalidArgument("empty prompt")
        vocab = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:  # C-speed passes first; the first bad id named as before
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidArgument(f"token id {bad} outside the vocabulary [0, {vocab})")
        limit = self.config.max_position_embeddings
        if len(ids) > limit:
            raise InvalidArgument(f"prompt of {len(ids)} tokens exceeds the model's maximum of {limit}")
        check_sampling(request.sampling.temperature, request.sampling.top_logprobs)
        return ids
