from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("moe_layer", "epoch", "slot_ids", "counts", "hidden", "experts", "wire_version", "token_rows", "pad")
    MOE_LAYER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ROWS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    moe_layer: int
    epoch: int
    slot_ids: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    experts: _containers.RepeatedScalarFieldContainer[int]
    wire_version: int
    token_rows: bytes
    pad: bytes
    def __init__(self, moe_layer: _Optional[int] = ..., epoch: _Optional[int] = ..., slot_ids: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., experts: _Optional[_Iterable[int]] = ..., wire_version: _Optional[int] = ..., token_rows: _Optional[bytes] = ..., pad: _Optional[bytes] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("output", "compute_seconds", "shard_id", "pad")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    compute_seconds: float
    shard_id: int
    pad: bytes
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., shard_id: _Optional[int] = ..., pad: _Optional[bytes] = ...) -> None: ...

class SlotAssignment(_message.Message):
    __slots__ = ("moe_layer", "slot", "expert")
    MOE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    moe_layer: int
    slot: int
    expert: int
    def __init__(self, moe_layer: _Optional[int] = ..., slot: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class LoadSlotsRequest(_message.Message):
    __slots__ = ("slots", "stage")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotAssignment]
    stage: bool
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotAssignment, _Mapping]]] = ..., stage: _Optional[bool] = ...) -> None: ...

class LoadSlotsResponse(_message.Message):
    __slots__ = ("bytes_loaded", "load_seconds", "weight_bytes")
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes_loaded: int
    load_seconds: float
    weight_bytes: int
    def __init__(self, bytes_loaded: _Optional[int] = ..., load_seconds: _Optional[float] = ..., weight_bytes: _Optional[int] = ...) -> None: ...

class SlotRef(_message.Message):
    __slots__ = ("moe_layer", "slot", "expert")
    MOE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    moe_layer: int
    slot: int
    expert: int
    def __init__(self, moe_layer: _Optional[int] = ..., slot: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class UnloadSlotsRequest(_message.Message):
    __slots__ = ("slots",)
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    slots: _containers.RepeatedCompositeFieldContainer[SlotRef]
    def __init__(self, slots: _Optional[_Iterable[_Union[SlotRef, _Mapping]]] = ...) -> None: ...

class UnloadSlotsResponse(_message.Message):
    __slots__ = ("slots_unloaded", "weight_bytes")
    SLOTS_UNLOADED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    slots_unloaded: int
    weight_bytes: int
    def __init__(self, slots_unloaded: _Optional[int] = ..., weight_bytes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerSlots(_message.Message):
    __slots__ = ("moe_layer", "slot_ids", "experts")
    MOE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOT_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    moe_layer: int
    slot_ids: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, moe_layer: _Optional[int] = ..., slot_ids: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("shard_id", "layers", "weight_bytes", "rss_bytes", "dtype", "pid", "address", "num_threads", "requests", "tokens", "compute_seconds", "last_epoch")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_THREADS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerSlots]
    weight_bytes: int
    rss_bytes: int
    dtype: str
    pid: int
    address: str
    num_threads: int
    requests: int
    tokens: int
    compute_seconds: float
    last_epoch: int
    def __init__(self, shard_id: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerSlots, _Mapping]]] = ..., weight_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., pid: _Optional[int] = ..., address: _Optional[str] = ..., num_threads: _Optional[int] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., last_epoch: _Optional[int] = ...) -> None: ...
