from baton.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_OUTCOME_UNSPECIFIED: _ClassVar[TransferOutcome]
    TRANSFER_OUTCOME_CONSUMED: _ClassVar[TransferOutcome]
    TRANSFER_OUTCOME_FAILED: _ClassVar[TransferOutcome]
    TRANSFER_OUTCOME_RECOMPUTED: _ClassVar[TransferOutcome]
    TRANSFER_OUTCOME_LOCAL: _ClassVar[TransferOutcome]
TRANSFER_OUTCOME_UNSPECIFIED: TransferOutcome
TRANSFER_OUTCOME_CONSUMED: TransferOutcome
TRANSFER_OUTCOME_FAILED: TransferOutcome
TRANSFER_OUTCOME_RECOMPUTED: TransferOutcome
TRANSFER_OUTCOME_LOCAL: TransferOutcome

class ScheduleRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_tokens", "kv_backend", "required_labels", "prompt_token_ids", "max_tokens", "remote_prefill", "avoid_workers", "move_from")
    class RequiredLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_LABELS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PREFILL_FIELD_NUMBER: _ClassVar[int]
    AVOID_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MOVE_FROM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_tokens: int
    kv_backend: str
    required_labels: _containers.ScalarMap[str, str]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    remote_prefill: bool
    avoid_workers: _containers.RepeatedScalarFieldContainer[str]
    move_from: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., kv_backend: _Optional[str] = ..., required_labels: _Optional[_Mapping[str, str]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., remote_prefill: _Optional[bool] = ..., avoid_workers: _Optional[_Iterable[str]] = ..., move_from: _Optional[str] = ...) -> None: ...

class WorkerEndpoint(_message.Message):
    __slots__ = ("worker_id", "address", "kv_address", "kv_endpoint")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    kv_address: str
    kv_endpoint: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., kv_address: _Optional[str] = ..., kv_endpoint: _Optional[str] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("prefill", "decode", "transfer_id", "kv_backend", "prefill_cached_tokens", "decode_cached_tokens", "decision")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    prefill: WorkerEndpoint
    decode: WorkerEndpoint
    transfer_id: str
    kv_backend: str
    prefill_cached_tokens: int
    decode_cached_tokens: int
    decision: str
    def __init__(self, prefill: _Optional[_Union[WorkerEndpoint, _Mapping]] = ..., decode: _Optional[_Union[WorkerEndpoint, _Mapping]] = ..., transfer_id: _Optional[str] = ..., kv_backend: _Optional[str] = ..., prefill_cached_tokens: _Optional[int] = ..., decode_cached_tokens: _Optional[int] = ..., decision: _Optional[str] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("transfer_id", "cached_tokens")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    cached_tokens: int
    def __init__(self, transfer_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("worker_id", "reset", "events", "load")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    reset: bool
    events: _containers.RepeatedCompositeFieldContainer[KVCacheEvent]
    load: EngineLoad
    def __init__(self, worker_id: _Optional[str] = ..., reset: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[KVCacheEvent, _Mapping]]] = ..., load: _Optional[_Union[EngineLoad, _Mapping]] = ...) -> None: ...

class KVCacheEvent(_message.Message):
    __slots__ = ("stored", "removed", "cleared")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    stored: BlocksStored
    removed: BlocksRemoved
    cleared: AllBlocksCleared
    def __init__(self, stored: _Optional[_Union[BlocksStored, _Mapping]] = ..., removed: _Optional[_Union[BlocksRemoved, _Mapping]] = ..., cleared: _Optional[_Union[AllBlocksCleared, _Mapping]] = ...) -> None: ...

class BlocksStored(_message.Message):
    __slots__ = ("block_hashes", "parent_block_hash", "token_ids", "block_size")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    parent_block_hash: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ..., parent_block_hash: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ...) -> None: ...

class BlocksRemoved(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class AllBlocksCleared(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineLoad(_message.Message):
    __slots__ = ("running", "waiting", "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_hits: _Optional[int] = ...) -> None: ...

class WorkerReportAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferReport(_message.Message):
    __slots__ = ("transfer_id", "outcome", "bytes", "tokens", "detail")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    outcome: TransferOutcome
    bytes: int
    tokens: int
    detail: str
    def __init__(self, transfer_id: _Optional[str] = ..., outcome: _Optional[_Union[TransferOutcome, str]] = ..., bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class TransferReportAck(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "role", "address", "kv_address", "model", "state", "in_flight", "transfers_total", "transfers_consumed", "transfers_failed", "transfers_expired", "prefix_source", "cached_blocks", "queued_prefill_tokens", "running", "engine", "kv_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _common_pb2.WorkerRole
    address: str
    kv_address: str
    model: str
    state: str
    in_flight: int
    transfers_total: int
    transfers_consumed: int
    transfers_failed: int
    transfers_expired: int
    prefix_source: str
    cached_blocks: int
    queued_prefill_tokens: int
    running: int
    engine: EngineLoad
    kv_bytes: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., address: _Optional[str] = ..., kv_address: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[str] = ..., in_flight: _Optional[int] = ..., transfers_total: _Optional[int] = ..., transfers_consumed: _Optional[int] = ..., transfers_failed: _Optional[int] = ..., transfers_expired: _Optional[int] = ..., prefix_source: _Optional[str] = ..., cached_blocks: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., running: _Optional[int] = ..., engine: _Optional[_Union[EngineLoad, _Mapping]] = ..., kv_bytes: _Optional[int] = ...) -> None: ...

class KVBackendStatus(_message.Message):
    __slots__ = ("backend", "placed", "consumed", "failed", "recomputed", "expired", "bytes", "fallbacks")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PLACED_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    placed: int
    consumed: int
    failed: int
    recomputed: int
    expired: int
    bytes: int
    fallbacks: int
    def __init__(self, backend: _Optional[str] = ..., placed: _Optional[int] = ..., consumed: _Optional[int] = ..., failed: _Optional[int] = ..., recomputed: _Optional[int] = ..., expired: _Optional[int] = ..., bytes: _Optional[int] = ..., fallbacks: _Optional[int] = ...) -> None: ...

class PrefixIndexStatus(_message.Message):
    __slots__ = ("predicted_tokens", "hit_tokens", "exact", "reported")
    PREDICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    predicted_tokens: int
    hit_tokens: int
    exact: int
    reported: int
    def __init__(self, predicted_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., exact: _Optional[int] = ..., reported: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "kv_backends", "prefix_index", "policy", "decisions", "recent_errors")
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    KV_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_INDEX_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    kv_backends: _containers.RepeatedCompositeFieldContainer[KVBackendStatus]
    prefix_index: PrefixIndexStatus
    policy: str
    decisions: _containers.ScalarMap[str, int]
    recent_errors: _containers.RepeatedCompositeFieldContainer[RecentError]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., kv_backends: _Optional[_Iterable[_Union[KVBackendStatus, _Mapping]]] = ..., prefix_index: _Optional[_Union[PrefixIndexStatus, _Mapping]] = ..., policy: _Optional[str] = ..., decisions: _Optional[_Mapping[str, int]] = ..., recent_errors: _Optional[_Iterable[_Union[RecentError, _Mapping]]] = ...) -> None: ...

class RecentError(_message.Message):
    __slots__ = ("unix_s", "kind", "worker_id", "transfer_id", "detail")
    UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    unix_s: float
    kind: str
    worker_id: str
    transfer_id: str
    detail: str
    def __init__(self, unix_s: _Optional[float] = ..., kind: _Optional[str] = ..., worker_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
