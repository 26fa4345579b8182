from asap.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptInput(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "trace", "cached_tokens", "more_chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MORE_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingOptions
    trace: _common_pb2.TraceContext
    cached_tokens: int
    more_chunks: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingOptions, _Mapping]] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., cached_tokens: _Optional[int] = ..., more_chunks: _Optional[bool] = ...) -> None: ...

class BatchAssignment(_message.Message):
    __slots__ = ("batch_id", "prompts", "trace", "step", "sync_participants", "drop_caches")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DROP_CACHES_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    prompts: _containers.RepeatedCompositeFieldContainer[PromptInput]
    trace: _common_pb2.TraceContext
    step: int
    sync_participants: int
    drop_caches: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, batch_id: _Optional[int] = ..., prompts: _Optional[_Iterable[_Union[PromptInput, _Mapping]]] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., step: _Optional[int] = ..., sync_participants: _Optional[int] = ..., drop_caches: _Optional[_Iterable[str]] = ...) -> None: ...

class PromptResult(_message.Message):
    __slots__ = ("request_id", "first_token_id", "first_token_logprob", "top_logprobs", "prompt_tokens", "error", "partial")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    first_token_logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    prompt_tokens: int
    error: _common_pb2.Error
    partial: bool
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_token_logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., partial: _Optional[bool] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("batch_id", "results", "error", "started_unix_nanos", "finished_unix_nanos", "expert_wait_nanos", "barrier_wait_nanos")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WAIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    BARRIER_WAIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    results: _containers.RepeatedCompositeFieldContainer[PromptResult]
    error: _common_pb2.Error
    started_unix_nanos: int
    finished_unix_nanos: int
    expert_wait_nanos: int
    barrier_wait_nanos: int
    def __init__(self, batch_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[PromptResult, _Mapping]]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., started_unix_nanos: _Optional[int] = ..., finished_unix_nanos: _Optional[int] = ..., expert_wait_nanos: _Optional[int] = ..., barrier_wait_nanos: _Optional[int] = ...) -> None: ...
