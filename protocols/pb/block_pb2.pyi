from protocols.pb import task_pb2 as _task_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockRequest(_message.Message):
    __slots__ = ("cids",)
    CIDS_FIELD_NUMBER: _ClassVar[int]
    cids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cids: _Optional[_Iterable[str]] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("cid", "data")
    CID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    cid: str
    data: bytes
    def __init__(self, cid: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlockResponse(_message.Message):
    __slots__ = ("blocks", "missing", "deferred", "error")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    DEFERRED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    missing: _containers.RepeatedScalarFieldContainer[str]
    deferred: _containers.RepeatedScalarFieldContainer[str]
    error: _task_pb2.Error
    def __init__(self, blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ..., deferred: _Optional[_Iterable[str]] = ..., error: _Optional[_Union[_task_pb2.Error, _Mapping]] = ...) -> None: ...
