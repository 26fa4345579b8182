from asap.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DispatchChunk(_message.Message):
    __slots__ = ("micro_batch", "layer", "row_offset", "total_rows", "hidden", "expert_ids", "weights", "trace", "attention_rank", "sent_unix_nanos", "step", "sync_participants", "cuda_region", "fast_link", "nixl_link")
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_RANK_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    CUDA_REGION_FIELD_NUMBER: _ClassVar[int]
    FAST_LINK_FIELD_NUMBER: _ClassVar[int]
    NIXL_LINK_FIELD_NUMBER: _ClassVar[int]
    micro_batch: int
    layer: int
    row_offset: int
    total_rows: int
    hidden: _common_pb2.Tensor
    expert_ids: _common_pb2.Tensor
    weights: _common_pb2.Tensor
    trace: _common_pb2.TraceContext
    attention_rank: int
    sent_unix_nanos: int
    step: int
    sync_participants: int
    cuda_region: _common_pb2.CudaRegion
    fast_link: FastLink
    nixl_link: NixlLink
    def __init__(self, micro_batch: _Optional[int] = ..., layer: _Optional[int] = ..., row_offset: _Optional[int] = ..., total_rows: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., trace: _Optional[_Union[_common_pb2.TraceContext, _Mapping]] = ..., attention_rank: _Optional[int] = ..., sent_unix_nanos: _Optional[int] = ..., step: _Optional[int] = ..., sync_participants: _Optional[int] = ..., cuda_region: _Optional[_Union[_common_pb2.CudaRegion, _Mapping]] = ..., fast_link: _Optional[_Union[FastLink, _Mapping]] = ..., nixl_link: _Optional[_Union[NixlLink, _Mapping]] = ...) -> None: ...

class NixlLink(_message.Message):
    __slots__ = ("agent", "metadata", "slots_address", "device_id", "memory", "slots", "slot_bytes", "hidden_size", "top_k", "itemsize")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SLOTS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ITEMSIZE_FIELD_NUMBER: _ClassVar[int]
    agent: str
    metadata: bytes
    slots_address: int
    device_id: int
    memory: str
    slots: int
    slot_bytes: int
    hidden_size: int
    top_k: int
    itemsize: int
    def __init__(self, agent: _Optional[str] = ..., metadata: _Optional[bytes] = ..., slots_address: _Optional[int] = ..., device_id: _Optional[int] = ..., memory: _Optional[str] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., hidden_size: _Optional[int] = ..., top_k: _Optional[int] = ..., itemsize: _Optional[int] = ...) -> None: ...

class FastLink(_message.Message):
    __slots__ = ("region", "request_bell", "completion_bell")
    REGION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BELL_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_BELL_FIELD_NUMBER: _ClassVar[int]
    region: str
    request_bell: str
    completion_bell: str
    def __init__(self, region: _Optional[str] = ..., request_bell: _Optional[str] = ..., completion_bell: _Optional[str] = ...) -> None: ...

class CombineChunk(_message.Message):
    __slots__ = ("micro_batch", "layer", "row_offset", "total_rows", "hidden", "error", "queue_nanos", "compute_nanos", "barrier_nanos", "nixl_link")
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NANOS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NANOS_FIELD_NUMBER: _ClassVar[int]
    BARRIER_NANOS_FIELD_NUMBER: _ClassVar[int]
    NIXL_LINK_FIELD_NUMBER: _ClassVar[int]
    micro_batch: int
    layer: int
    row_offset: int
    total_rows: int
    hidden: _common_pb2.Tensor
    error: _common_pb2.Error
    queue_nanos: int
    compute_nanos: int
    barrier_nanos: int
    nixl_link: NixlLink
    def __init__(self, micro_batch: _Optional[int] = ..., layer: _Optional[int] = ..., row_offset: _Optional[int] = ..., total_rows: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ..., queue_nanos: _Optional[int] = ..., compute_nanos: _Optional[int] = ..., barrier_nanos: _Optional[int] = ..., nixl_link: _Optional[_Union[NixlLink, _Mapping]] = ...) -> None: ...

class ExpertInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "expert_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("rank", "model_type", "hidden_size", "num_layers", "num_experts", "dtype", "layers", "device", "shm_data_plane", "cuda_ipc_data_plane", "gpu_uuids", "fast_data_plane", "nixl_data_plane")
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHM_DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    FAST_DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    NIXL_DATA_PLANE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    model_type: str
    hidden_size: int
    num_layers: int
    num_experts: int
    dtype: _common_pb2.DType
    layers: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    device: str
    shm_data_plane: bool
    cuda_ipc_data_plane: bool
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    fast_data_plane: bool
    nixl_data_plane: bool
    def __init__(self, rank: _Optional[int] = ..., model_type: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., layers: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., device: _Optional[str] = ..., shm_data_plane: _Optional[bool] = ..., cuda_ipc_data_plane: _Optional[bool] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., fast_data_plane: _Optional[bool] = ..., nixl_data_plane: _Optional[bool] = ...) -> None: ...
