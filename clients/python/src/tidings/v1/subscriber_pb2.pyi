import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tidings.v1 import message_pb2 as _message_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckOperation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_OPERATION_UNSPECIFIED: _ClassVar[AckOperation]
    ACK_OPERATION_ACK: _ClassVar[AckOperation]
    ACK_OPERATION_NACK: _ClassVar[AckOperation]
    ACK_OPERATION_EXTEND: _ClassVar[AckOperation]
    ACK_OPERATION_RELEASE: _ClassVar[AckOperation]

class AckResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_RESULT_UNSPECIFIED: _ClassVar[AckResult]
    ACK_RESULT_OK: _ClassVar[AckResult]
    ACK_RESULT_STALE: _ClassVar[AckResult]
    ACK_RESULT_UNKNOWN: _ClassVar[AckResult]

class MessageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_STATE_UNSPECIFIED: _ClassVar[MessageState]
    MESSAGE_STATE_NEW: _ClassVar[MessageState]
    MESSAGE_STATE_READY: _ClassVar[MessageState]
    MESSAGE_STATE_BACKOFF: _ClassVar[MessageState]
    MESSAGE_STATE_LEASED: _ClassVar[MessageState]
    MESSAGE_STATE_HELD: _ClassVar[MessageState]
ACK_OPERATION_UNSPECIFIED: AckOperation
ACK_OPERATION_ACK: AckOperation
ACK_OPERATION_NACK: AckOperation
ACK_OPERATION_EXTEND: AckOperation
ACK_OPERATION_RELEASE: AckOperation
ACK_RESULT_UNSPECIFIED: AckResult
ACK_RESULT_OK: AckResult
ACK_RESULT_STALE: AckResult
ACK_RESULT_UNKNOWN: AckResult
MESSAGE_STATE_UNSPECIFIED: MessageState
MESSAGE_STATE_NEW: MessageState
MESSAGE_STATE_READY: MessageState
MESSAGE_STATE_BACKOFF: MessageState
MESSAGE_STATE_LEASED: MessageState
MESSAGE_STATE_HELD: MessageState

class ReceivedMessage(_message.Message):
    __slots__ = ("message", "ack_id", "attempt", "lease_deadline")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    message: _message_pb2.Message
    ack_id: str
    attempt: int
    lease_deadline: _timestamp_pb2.Timestamp
    def __init__(self, message: _Optional[_Union[_message_pb2.Message, _Mapping]] = ..., ack_id: _Optional[str] = ..., attempt: _Optional[int] = ..., lease_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("ack_id", "delay", "reason")
    ACK_ID_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ack_id: str
    delay: _duration_pb2.Duration
    reason: str
    def __init__(self, ack_id: _Optional[str] = ..., delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaseExtension(_message.Message):
    __slots__ = ("ack_id", "extension")
    ACK_ID_FIELD_NUMBER: _ClassVar[int]
    EXTENSION_FIELD_NUMBER: _ClassVar[int]
    ack_id: str
    extension: _duration_pb2.Duration
    def __init__(self, ack_id: _Optional[str] = ..., extension: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AckOutcome(_message.Message):
    __slots__ = ("ack_id", "operation", "result", "lease_deadline", "detail")
    ACK_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ack_id: str
    operation: AckOperation
    result: AckResult
    lease_deadline: _timestamp_pb2.Timestamp
    detail: str
    def __init__(self, ack_id: _Optional[str] = ..., operation: _Optional[_Union[AckOperation, str]] = ..., result: _Optional[_Union[AckResult, str]] = ..., lease_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detail: _Optional[str] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("subscription", "max_outstanding_messages", "max_outstanding_bytes", "ack_ids", "nacks", "extensions", "release_ack_ids", "max_response_bytes")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTSTANDING_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTSTANDING_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACK_IDS_FIELD_NUMBER: _ClassVar[int]
    NACKS_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ACK_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    subscription: str
    max_outstanding_messages: int
    max_outstanding_bytes: int
    ack_ids: _containers.RepeatedScalarFieldContainer[str]
    nacks: _containers.RepeatedCompositeFieldContainer[Nack]
    extensions: _containers.RepeatedCompositeFieldContainer[LeaseExtension]
    release_ack_ids: _containers.RepeatedScalarFieldContainer[str]
    max_response_bytes: int
    def __init__(self, subscription: _Optional[str] = ..., max_outstanding_messages: _Optional[int] = ..., max_outstanding_bytes: _Optional[int] = ..., ack_ids: _Optional[_Iterable[str]] = ..., nacks: _Optional[_Iterable[_Union[Nack, _Mapping]]] = ..., extensions: _Optional[_Iterable[_Union[LeaseExtension, _Mapping]]] = ..., release_ack_ids: _Optional[_Iterable[str]] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("messages", "outcomes")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ReceivedMessage]
    outcomes: _containers.RepeatedCompositeFieldContainer[AckOutcome]
    def __init__(self, messages: _Optional[_Iterable[_Union[ReceivedMessage, _Mapping]]] = ..., outcomes: _Optional[_Iterable[_Union[AckOutcome, _Mapping]]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("subscription", "max_messages", "max_wait", "max_response_bytes")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    subscription: str
    max_messages: int
    max_wait: _duration_pb2.Duration
    max_response_bytes: int
    def __init__(self, subscription: _Optional[str] = ..., max_messages: _Optional[int] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ReceivedMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ReceivedMessage, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("subscription", "ack_ids")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ACK_IDS_FIELD_NUMBER: _ClassVar[int]
    subscription: str
    ack_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, subscription: _Optional[str] = ..., ack_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[AckOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[AckOutcome, _Mapping]]] = ...) -> None: ...

class NackRequest(_message.Message):
    __slots__ = ("subscription", "nacks")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    NACKS_FIELD_NUMBER: _ClassVar[int]
    subscription: str
    nacks: _containers.RepeatedCompositeFieldContainer[Nack]
    def __init__(self, subscription: _Optional[str] = ..., nacks: _Optional[_Iterable[_Union[Nack, _Mapping]]] = ...) -> None: ...

class NackResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[AckOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[AckOutcome, _Mapping]]] = ...) -> None: ...

class ExtendLeaseRequest(_message.Message):
    __slots__ = ("subscription", "extensions")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    subscription: str
    extensions: _containers.RepeatedCompositeFieldContainer[LeaseExtension]
    def __init__(self, subscription: _Optional[str] = ..., extensions: _Optional[_Iterable[_Union[LeaseExtension, _Mapping]]] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[AckOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[AckOutcome, _Mapping]]] = ...) -> None: ...

class PeekedMessage(_message.Message):
    __slots__ = ("message", "state", "attempts", "available_time", "last_failure_reason")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    message: _message_pb2.Message
    state: MessageState
    attempts: int
    available_time: _timestamp_pb2.Timestamp
    last_failure_reason: str
    def __init__(self, message: _Optional[_Union[_message_pb2.Message, _Mapping]] = ..., state: _Optional[_Union[MessageState, str]] = ..., attempts: _Optional[int] = ..., available_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_failure_reason: _Optional[str] = ...) -> None: ...

class PeekRequest(_message.Message):
    __slots__ = ("subscription", "page_size", "page_token", "max_response_bytes")
    SUBSCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    subscription: str
    page_size: int
    page_token: str
    max_response_bytes: int
    def __init__(self, subscription: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., max_response_bytes: _Optional[int] = ...) -> None: ...

class PeekResponse(_message.Message):
    __slots__ = ("messages", "next_page_token")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[PeekedMessage]
    next_page_token: str
    def __init__(self, messages: _Optional[_Iterable[_Union[PeekedMessage, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
