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
# Nesting levels a JSON payload (task data, result, record field) may have. Fixed, and far below
# Python's recursion limit, so a value accepted once encodes and decodes again in any call
# stack (a daemon handler, a trio task, a peer); serde_json's default is the same 128.
MAX_JSON_DEPTH = 128


def json_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``value`` nests dicts/lists/tuples more than ``limit`` levels (or is circular).

    Iterative, so it cannot itself overflow the stack; it only visits containers' children.
    """
    containers = (dict, list, tuple)
    if not isinstance(value, containers):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, containers):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


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
    too_deep = f"{what} is JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)"
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessageError(f"{what} is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise MalformedMessageError(too_deep) from None
    if json_too_deep(value):
        raise MalformedMessageError(too_deep)
    return value
