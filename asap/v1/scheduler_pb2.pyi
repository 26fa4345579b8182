from asap.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "tokens", "text", "sampling", "ttft_slo_ms", "trace", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TTFT_SLO_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tokens: TokenIds
    text: str
    sampling: _common_pb2.SamplingOptions
    ttft_slo_ms: int
    trace: _common_pb2.TraceContext
    timeout_ms: int
    def __init__(self, request_id: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., text: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingOptions, _Mapping]] = ..., ttft_slo_ms: _Optional[int] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("request_id", "first_token_id", "first_token_logprob", "top_logprobs", "prompt_tokens", "queue_ms", "ttft_ms", "attention_rank", "trace_id", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_RANK_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    first_token_logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    prompt_tokens: int
    queue_ms: float
    ttft_ms: float
    attention_rank: int
    trace_id: str
    error: _common_pb2.Error
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_token_logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., attention_rank: _Optional[int] = ..., trace_id: _Optional[str] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class ClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttentionRankState(_message.Message):
    __slots__ = ("rank", "target", "healthy", "queued_requests", "queued_tokens", "running_batches", "predicted_load_ms")
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_BATCHES_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    target: str
    healthy: bool
    queued_requests: int
    queued_tokens: int
    running_batches: int
    predicted_load_ms: float
    def __init__(self, rank: _Optional[int] = ..., target: _Optional[str] = ..., healthy: _Optional[bool] = ..., queued_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., running_batches: _Optional[int] = ..., predicted_load_ms: _Optional[float] = ...) -> None: ...

class ClusterState(_message.Message):
    __slots__ = ("mode", "model_type", "model", "attention_ranks", "expert_targets", "pending_requests", "completed_requests", "failed_requests", "vocab_size", "max_prompt_tokens")
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_RANKS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TARGETS_FIELD_NUMBER: _ClassVar[int]
    PENDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    model_type: str
    model: str
    attention_ranks: _containers.RepeatedCompositeFieldContainer[AttentionRankState]
    expert_targets: _containers.RepeatedScalarFieldContainer[str]
    pending_requests: int
    completed_requests: int
    failed_requests: int
    vocab_size: int
    max_prompt_tokens: int
    def __init__(self, mode: _Optional[str] = ..., model_type: _Optional[str] = ..., model: _Optional[str] = ..., attention_ranks: _Optional[_Iterable[_Union[AttentionRankState, _Mapping]]] = ..., expert_targets: _Optional[_Iterable[str]] = ..., pending_requests: _Optional[int] = ..., completed_requests: _Optional[int] = ..., failed_requests: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...
