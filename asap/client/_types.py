"""Plain value types of the client SDK: what goes in (``PrefillRequestSpec``) and what comes out.

No grpc or protobuf here; ``_client`` converts to and from the wire messages.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

from asap.errors import InvalidArgument
from asap.sampling_options import check_sampling

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


class ClientState(enum.Enum):
    """Lifecycle of an ``AsapClient``: UNOPENED -> OPENED -> CLOSED, never back."""

    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class PrefillOptions(TypedDict, total=False):
    """The keyword arguments of ``prefill`` after ``tokens``, spelled once for the async and blocking
    clients; they are ``PrefillRequestSpec``'s other fields, whose defaults apply."""

    text: str | None
    top_logprobs: int
    temperature: float
    seed: int | None
    ttft_slo_ms: int | None
    request_id: str | None
    timeout_s: float | None


def _check_token_ids(tokens: tuple[int, ...]) -> None:
    """``InvalidArgument`` naming the first token that is not an int in [0, 2**31): plain ints are
    checked with one pass over their types and a min / max (~5 µs for 128 tokens, against ~0.3 ms for
    three checks per token on a loaded host); anything else (bool, int subclasses) token by token."""
    if set(map(type, tokens)) == {int} and min(tokens) >= 0 and max(tokens) <= _INT32_MAX:
        return
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= _INT32_MAX:
            raise InvalidArgument(f"token id {token!r} is not an int in [0, {_INT32_MAX}]")


@dataclass(frozen=True, slots=True)
class PrefillRequestSpec:
    """One prefill request, validated on construction (``InvalidArgument`` on bad input).

    Exactly one of ``tokens`` / ``text`` must be given and non-empty. ``timeout_s`` is the per-request
    deadline; on ``prefill_many`` it travels in the request (the stream has one deadline of its own).
    ``request_id`` of ``None`` gets a fresh id from the client.
    """

    tokens: tuple[int, ...] | None = None
    text: str | None = None
    top_logprobs: int = 0
    temperature: float = 0.0
    seed: int | None = None
    ttft_slo_ms: int | None = None
    request_id: str | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.text is None):
            raise InvalidArgument("give exactly one of tokens or text")
        if self.tokens is not None:
            # Accept any sequence from callers; store an immutable tuple.
            object.__setattr__(self, "tokens", tuple(self.tokens))
            if not self.tokens:
                raise InvalidArgument("empty prompt: tokens is empty")
            _check_token_ids(self.tokens)
        if self.text is not None and not self.text:
            raise InvalidArgument("empty prompt: text is empty")
        check_sampling(self.temperature, self.top_logprobs)
        if self.seed is not None and not 0 <= self.seed <= _UINT64_MAX:
            raise InvalidArgument(f"seed must be in [0, 2**64), got {self.seed}")
        if self.ttft_slo_ms is not None and not 0 < self.ttft_slo_ms <= _UINT32_MAX:
            raise InvalidArgument(f"ttft_slo_ms must be > 0, got {self.ttft_slo_ms}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.request_id is not None and not self.request_id:
            raise InvalidArgument("request_id must be non-empty when given")

    @classmethod
    def from_kwargs(
        cls, *, tokens: Sequence[int] | None = None, **options: Unpack[PrefillOptions]
    ) -> PrefillRequestSpec:
        """Build a spec from the keyword arguments ``AsapClient.prefill`` takes (any token sequence)."""
        return cls(tokens=None if tokens is None else tuple(tokens), **options)


@dataclass(frozen=True, slots=True)
class PrefillResult:
    """The outcome of one prefill: the first generated token and how long it took."""

    request_id: str
    first_token_id: int
    first_token_logprob: float
    top_logprobs: tuple[tuple[int, float], ...]
    """``(token_id, logprob)`` pairs, most likely first."""
    prompt_tokens: int
    ttft_ms: float
    """Arrival at the scheduler -> first token known."""
    queue_ms: float
    """Arrival at the scheduler -> batch sent to an attention rank."""
    attention_rank: int
    trace_id: str

    def to_json_dict(self) -> dict[str, Any]:
        """The object ``asap prefill --json`` prints (the README's command-line section), exactly these keys."""
        return {
            "request_id": self.request_id,
            "first_token_id": self.first_token_id,
            "first_token_logprob": self.first_token_logprob,
            "top_logprobs": [[token_id, logprob] for token_id, logprob in self.top_logprobs],
            "prompt_tokens": self.prompt_tokens,
            "ttft_ms": self.ttft_ms,
            "trace_id": self.trace_id,
        }


@dataclass(frozen=True, slots=True)
class AttentionRankState:
    """The scheduler's view of one attention rank."""

    rank: int
    target: str
    healthy: bool
    queued_requests: int
    queued_tokens: int
    running_batches: int
    predicted_load_ms: float


@dataclass(frozen=True, slots=True)
class ClusterState:
    """A snapshot of the cluster as the scheduler sees it."""

    mode: str
    model_type: str
    model: str
    attention_ranks: tuple[AttentionRankState, ...] = field(default=())
    expert_targets: tuple[str, ...] = field(default=())
    pending_requests: int = 0
    completed_requests: int = 0
    failed_requests: int = 0
    vocab_size: int = 0
    max_prompt_tokens: int = 0
