from baton.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "transfer_id", "first_token_id", "kv_backend", "kv_source")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    KV_SOURCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.EngineSampling
    transfer_id: str
    first_token_id: int
    kv_backend: str
    kv_source: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.EngineSampling, _Mapping]] = ..., transfer_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., kv_backend: _Optional[str] = ..., kv_source: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("tokens", "kv", "prompt_logprobs", "handing_off")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    HANDING_OFF_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.GeneratedTokens
    kv: _common_pb2.KVLoadStats
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.PositionLogprobs]
    handing_off: bool
    def __init__(self, tokens: _Optional[_Union[_common_pb2.GeneratedTokens, _Mapping]] = ..., kv: _Optional[_Union[_common_pb2.KVLoadStats, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.PositionLogprobs, _Mapping]]] = ..., handing_off: _Optional[bool] = ...) -> None: ...

class HandOffRequest(_message.Message):
    __slots__ = ("request_id", "transfer_id", "kv_target", "kv_backend")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    KV_TARGET_FIELD_NUMBER: _ClassVar[int]
    KV_BACKEND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    transfer_id: str
    kv_target: str
    kv_backend: str
    def __init__(self, request_id: _Optional[str] = ..., transfer_id: _Optional[str] = ..., kv_target: _Optional[str] = ..., kv_backend: _Optional[str] = ...) -> None: ...

class HandOffResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    def __init__(self, tokens: _Optional[int] = ...) -> None: ...
