from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DiscardRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class DiscardAck(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("transfer_id", "num_tokens", "block_size", "num_blocks", "layer_names", "dtype", "block_shape", "layout_hash", "wire_version")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYER_NAMES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_HASH_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    num_tokens: int
    block_size: int
    num_blocks: int
    layer_names: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    block_shape: _containers.RepeatedScalarFieldContainer[int]
    layout_hash: str
    wire_version: int
    def __init__(self, transfer_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., layer_names: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., block_shape: _Optional[_Iterable[int]] = ..., layout_hash: _Optional[str] = ..., wire_version: _Optional[int] = ...) -> None: ...

class KVData(_message.Message):
    __slots__ = ("layer_index", "offset", "data", "crc32")
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    layer_index: int
    offset: int
    data: bytes
    crc32: int
    def __init__(self, layer_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    data: KVData
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., data: _Optional[_Union[KVData, _Mapping]] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("transfer_id", "wait_timeout_ms", "start_timeout_ms")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    START_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    wait_timeout_ms: int
    start_timeout_ms: int
    def __init__(self, transfer_id: _Optional[str] = ..., wait_timeout_ms: _Optional[int] = ..., start_timeout_ms: _Optional[int] = ...) -> None: ...

class KVStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStats(_message.Message):
    __slots__ = ("staged_bytes", "staged_transfers", "received_total", "fetched_total", "expired_total", "rejected_total", "failed_total", "never_started_total")
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGED_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FETCHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NEVER_STARTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    staged_bytes: int
    staged_transfers: int
    received_total: int
    fetched_total: int
    expired_total: int
    rejected_total: int
    failed_total: int
    never_started_total: int
    def __init__(self, staged_bytes: _Optional[int] = ..., staged_transfers: _Optional[int] = ..., received_total: _Optional[int] = ..., fetched_total: _Optional[int] = ..., expired_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., never_started_total: _Optional[int] = ...) -> None: ...
