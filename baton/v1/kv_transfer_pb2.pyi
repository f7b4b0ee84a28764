from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

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

class PushAck(_message.Message):
    __slots__ = ("bytes",)
    BYTES_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    def __init__(self, bytes: _Optional[int] = ...) -> None: ...

class KVStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStats(_message.Message):
    __slots__ = ("inbox_bytes", "inbox_transfers", "received_total", "loaded_total", "expired_total", "refused_total", "failed_total", "never_started_total")
    INBOX_BYTES_FIELD_NUMBER: _ClassVar[int]
    INBOX_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOADED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REFUSED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NEVER_STARTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    inbox_bytes: int
    inbox_transfers: int
    received_total: int
    loaded_total: int
    expired_total: int
    refused_total: int
    failed_total: int
    never_started_total: int
    def __init__(self, inbox_bytes: _Optional[int] = ..., inbox_transfers: _Optional[int] = ..., received_total: _Optional[int] = ..., loaded_total: _Optional[int] = ..., expired_total: _Optional[int] = ..., refused_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., never_started_total: _Optional[int] = ...) -> None: ...
