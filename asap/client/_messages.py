"""Conversions between the client's types and the scheduler's messages."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import Any

from asap.client._types import AttentionRankState, ClusterState, PrefillRequestSpec, PrefillResult
from asap.errors import InvalidArgument
from asap.v1 import common_pb2, scheduler_pb2

_UINT32_MAX = 2**32 - 1


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_proto(spec: PrefillRequestSpec, request_id: str, *, on_stream: bool) -> Any:
    request = scheduler_pb2.PrefillRequest(
        request_id=request_id,
        sampling=common_pb2.SamplingOptions(
            temperature=spec.temperature,
            seed=spec.seed or 0,
            top_logprobs=spec.top_logprobs,
        ),
        ttft_slo_ms=spec.ttft_slo_ms or 0,
    )
    if spec.tokens is not None:
        request.tokens.ids.extend(spec.tokens)
    elif spec.text is not None:
        request.text = spec.text
    # Unary calls carry their deadline as the gRPC deadline; stream items need it in the message.
    if on_stream and spec.timeout_s is not None:
        request.timeout_ms = min(_UINT32_MAX, max(1, math.ceil(spec.timeout_s * 1000)))
    return request


def result_from_proto(response: Any, sent_request_id: str) -> PrefillResult:
    return PrefillResult(
        request_id=response.request_id or sent_request_id,
        first_token_id=response.first_token_id,
        first_token_logprob=response.first_token_logprob,
        top_logprobs=tuple((entry.token_id, entry.logprob) for entry in response.top_logprobs),
        prompt_tokens=response.prompt_tokens,
        ttft_ms=response.ttft_ms,
        queue_ms=response.queue_ms,
        attention_rank=response.attention_rank,
        trace_id=response.trace_id,
    )


def cluster_state_from_proto(state: Any) -> ClusterState:
    return ClusterState(
        mode=state.mode,
        model_type=state.model_type,
        model=state.model,
        attention_ranks=tuple(
            AttentionRankState(
                rank=rank.rank,
                target=rank.target,
                healthy=rank.healthy,
                queued_requests=rank.queued_requests,
                queued_tokens=rank.queued_tokens,
                running_batches=rank.running_batches,
                predicted_load_ms=rank.predicted_load_ms,
            )
            for rank in state.attention_ranks
        ),
        expert_targets=tuple(state.expert_targets),
        pending_requests=state.pending_requests,
        completed_requests=state.completed_requests,
        failed_requests=state.failed_requests,
        vocab_size=state.vocab_size,
        max_prompt_tokens=state.max_prompt_tokens,
    )


def as_spec(item: PrefillRequestSpec | Mapping[str, Any]) -> PrefillRequestSpec:
    if isinstance(item, PrefillRequestSpec):
        return item
    try:
        return PrefillRequestSpec.from_kwargs(**item)
    except TypeError as exc:
        raise InvalidArgument(f"bad prefill request {dict(item)!r}: {exc}") from None
