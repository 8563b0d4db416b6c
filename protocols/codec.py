"""Strict protobuf decoding and field checks shared by the gossip and stream protocols.

Unknown fields are refused: a protobuf parser accepts almost any bytes as almost any message
(an Announcement decodes as a TaskRequest carrying a claim), so a frame of the wrong message is
recognised by its fields that v1 does not define. A newer protocol with new fields gets a new
protocol id (``/dsi/task/1.1.0``), negotiated by multistream-select, so strictness costs no
compatibility.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from protocols.errors import MalformedMessageError

M = TypeVar("M", bound=Message)

MAX_ID_LEN = 512  # task ids, task types, lease ids (the task queue allows 512)
MAX_LIST_LEN = 64  # tags, requires, capabilities, addrs
MAX_ITEM_LEN = 256


def has_unknown_fields(msg: Message) -> bool:
    if len(UnknownFieldSet(msg)):
        return True
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.is_repeated:
            if any(has_unknown_fields(v) for v in value):
                return True
        elif has_unknown_fields(value):
            return True
    return False


def parse_strict(cls: type[M], data: bytes) -> M:
    """Decode ``data`` as ``cls``; refuse undecodable bytes and unknown fields."""
    msg = cls()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedMessageError(f"not a {cls.DESCRIPTOR.full_name}: {exc}") from None
    if has_unknown_fields(msg):
        raise MalformedMessageError(
            f"not a {cls.DESCRIPTOR.full_name}: it carries fields v1 does not define"
        )
    return msg


def check_id(value: str, what: str) -> None:
    if not value:
        raise MalformedMessageError(f"{what} is empty")
    if len(value) > MAX_ID_LEN:
        raise MalformedMessageError(f"{what} is longer than {MAX_ID_LEN} characters")


def check_list(values: Any, what: str) -> None:
    if len(values) > MAX_LIST_LEN:
        raise MalformedMessageError(f"{what} has more than {MAX_LIST_LEN} entries")
    for v in values:
        if not v or len(v) > MAX_ITEM_LEN:
            raise MalformedMessageError(f"{what} holds an empty or over-long entry")


def encode_json(value: Any) -> bytes:
    """UTF-8 JSON for the ``bytes`` payload fields (``data``, ``result``); None is empty."""
    if value is None:
        return b""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_json(data: bytes, what: str) -> Any:
    if not data:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessageError(f"{what} is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessageError(f"{what} is JSON nested too deeply") from None
