from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_PENDING: _ClassVar[TaskState]
    TASK_STATE_CLAIMED: _ClassVar[TaskState]
    TASK_STATE_COMPLETED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_ALREADY_CLAIMED: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_LEASE_HOLDER: _ClassVar[ErrorCode]
    ERROR_CODE_LEASE_EXPIRED: _ClassVar[ErrorCode]
    ERROR_CODE_INCAPABLE: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_REQUEST: _ClassVar[ErrorCode]
    ERROR_CODE_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_PENDING: TaskState
TASK_STATE_CLAIMED: TaskState
TASK_STATE_COMPLETED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_ALREADY_CLAIMED: ErrorCode
ERROR_CODE_NOT_LEASE_HOLDER: ErrorCode
ERROR_CODE_LEASE_EXPIRED: ErrorCode
ERROR_CODE_INCAPABLE: ErrorCode
ERROR_CODE_BAD_REQUEST: ErrorCode
ERROR_CODE_DENIED: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class Announcement(_message.Message):
    __slots__ = ("offer", "update")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    offer: TaskOffer
    update: TaskUpdate
    def __init__(self, offer: _Optional[_Union[TaskOffer, _Mapping]] = ..., update: _Optional[_Union[TaskUpdate, _Mapping]] = ...) -> None: ...

class TaskOffer(_message.Message):
    __slots__ = ("task_id", "task_type", "priority", "tags", "requires", "owner_peer_id", "owner_addrs", "submitted_at_ms", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    OWNER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ADDRS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_type: str
    priority: int
    tags: _containers.RepeatedScalarFieldContainer[str]
    requires: _containers.RepeatedScalarFieldContainer[str]
    owner_peer_id: str
    owner_addrs: _containers.RepeatedScalarFieldContainer[str]
    submitted_at_ms: int
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., task_type: _Optional[str] = ..., priority: _Optional[int] = ..., tags: _Optional[_Iterable[str]] = ..., requires: _Optional[_Iterable[str]] = ..., owner_peer_id: _Optional[str] = ..., owner_addrs: _Optional[_Iterable[str]] = ..., submitted_at_ms: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class TaskUpdate(_message.Message):
    __slots__ = ("task_id", "state", "owner_peer_id", "worker_peer_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OWNER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    owner_peer_id: str
    worker_peer_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., owner_peer_id: _Optional[str] = ..., worker_peer_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("claim", "complete", "heartbeat", "fail", "status", "list")
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FAIL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    claim: ClaimRequest
    complete: CompleteRequest
    heartbeat: HeartbeatRequest
    fail: FailRequest
    status: StatusRequest
    list: ListRequest
    def __init__(self, claim: _Optional[_Union[ClaimRequest, _Mapping]] = ..., complete: _Optional[_Union[CompleteRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ..., fail: _Optional[_Union[FailRequest, _Mapping]] = ..., status: _Optional[_Union[StatusRequest, _Mapping]] = ..., list: _Optional[_Union[ListRequest, _Mapping]] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("task_id", "capabilities")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("task_id", "lease_id", "result", "result_cid")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESULT_CID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    result: bytes
    result_cid: str
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., result: _Optional[bytes] = ..., result_cid: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("task_id", "lease_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class FailRequest(_message.Message):
    __slots__ = ("task_id", "lease_id", "error", "retryable")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    error: str
    retryable: bool
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("capabilities", "limit")
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    def __init__(self, capabilities: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ...) -> None: ...

class TaskResponse(_message.Message):
    __slots__ = ("error", "grant", "ack", "status", "list")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    error: Error
    grant: ClaimGrant
    ack: Ack
    status: TaskStatus
    list: TaskList
    def __init__(self, error: _Optional[_Union[Error, _Mapping]] = ..., grant: _Optional[_Union[ClaimGrant, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., status: _Optional[_Union[TaskStatus, _Mapping]] = ..., list: _Optional[_Union[TaskList, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ClaimGrant(_message.Message):
    __slots__ = ("task_id", "lease_id", "lease_expires_at_ms", "task_type", "data", "data_cid", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_CID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    lease_expires_at_ms: int
    task_type: str
    data: bytes
    data_cid: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease_expires_at_ms: _Optional[int] = ..., task_type: _Optional[str] = ..., data: _Optional[bytes] = ..., data_cid: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("task_id", "state")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "state", "worker_peer_id", "attempt", "result", "result_cid", "error")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESULT_CID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    worker_peer_id: str
    attempt: int
    result: bytes
    result_cid: str
    error: str
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., worker_peer_id: _Optional[str] = ..., attempt: _Optional[int] = ..., result: _Optional[bytes] = ..., result_cid: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class TaskList(_message.Message):
    __slots__ = ("offers",)
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    offers: _containers.RepeatedCompositeFieldContainer[TaskOffer]
    def __init__(self, offers: _Optional[_Iterable[_Union[TaskOffer, _Mapping]]] = ...) -> None: ...
