"""Validation and normalisation of task fields, shared by the queue and its callers.

Everything that reaches SQLite goes through here first, so the database only ever holds
normalised values: canonical JSON, sorted de-duplicated tags and requirements, and a
``requires_key`` that lets capability filtering happen in SQL.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

from node.errors import InvalidArgumentError, InvalidCIDError
from protocols.codec import MAX_JSON_DEPTH, json_too_deep

PENDING = "pending"
CLAIMED = "claimed"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STATES: tuple[str, ...] = (PENDING, CLAIMED, COMPLETED, FAILED, CANCELLED)
TERMINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})

TAG_P2P_ELIGIBLE = "P2P_ELIGIBLE"
TAG_GPU_PREFERRED = "GPU_PREFERRED"
#: A worker whose capabilities contain any of these (case-insensitive) is GPU-capable.
GPU_CAPABILITIES = frozenset({"gpu", "cuda", "rocm", "mps", "xpu"})

MAX_PRIORITY = 10
MAX_ID_LENGTH = 512
MAX_ERROR_LENGTH = 65536
# \x1f (unit separator) cannot occur in a requirement, so the joined key is unambiguous.
_KEY_SEP = "\x1f"


def check_id(value: Any, name: str = "task_id") -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgumentError(f"{name} is longer than {MAX_ID_LENGTH} characters")
    return value


def check_priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise InvalidArgumentError(
            f"priority must be an integer from 0 to {MAX_PRIORITY} (higher runs first), "
            f"got {value!r}"
        )
    return value


def check_max_attempts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        raise InvalidArgumentError(f"max_attempts must be an integer from 1 to 1000, got {value!r}")
    return value


def check_lease_seconds(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= 7 * 86400
    ):
        raise InvalidArgumentError(
            f"lease_seconds must be a number of seconds > 0 and <= 604800, got {value!r}"
        )
    return float(value)


def to_json(value: Any, name: str) -> str:
    """Canonical JSON (sorted keys, no NaN): equal values give equal text."""
    if json_too_deep(value):
        raise InvalidArgumentError(
            f"{name} is nested more than {MAX_JSON_DEPTH} levels deep (or is circular); "
            "flatten it or store it as a file and pass its CID"
        )
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise InvalidArgumentError(f"{name} is nested too deeply (or circular) for JSON") from None
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{name} must be JSON-serialisable (dicts, lists, str, int, finite float, bool, "
            f"None); store binary data as a block and pass its CID instead ({exc})"
        ) from None


def _strings(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidArgumentError(f"{name} must be a list of strings, got {value!r}")
    items = list(value)
    for item in items:
        if not isinstance(item, str) or not item.strip() or _KEY_SEP in item:
            raise InvalidArgumentError(f"{name} must hold non-empty strings, got {item!r}")
    return [item.strip() for item in items]


def norm_tags(tags: Any) -> list[str]:
    """Sorted, de-duplicated; tags keep their spelling (matching of known tags ignores case)."""
    return sorted(set(_strings(tags, "tags")))


def norm_requires(requires: Any) -> list[str]:
    """Sorted, de-duplicated case-insensitively (the first spelling seen is kept)."""
    seen: dict[str, str] = {}
    for item in _strings(requires, "requires"):
        seen.setdefault(item.casefold(), item)
    return [seen[k] for k in sorted(seen)]


def requires_key(requires: list[str]) -> str:
    """The normalised requirement set as one string ('' = no requirement)."""
    return _KEY_SEP.join(sorted({r.casefold() for r in requires}))


def key_requirements(key: str) -> frozenset[str]:
    return frozenset(key.split(_KEY_SEP)) if key else frozenset()


def norm_capabilities(capabilities: Any) -> frozenset[str]:
    return frozenset(c.casefold() for c in _strings(capabilities, "capabilities"))


def is_gpu_worker(caps: frozenset[str]) -> bool:
    return not caps.isdisjoint(GPU_CAPABILITIES)


def has_tag(tags: list[str], tag: str) -> bool:
    t = tag.casefold()
    return any(x.casefold() == t for x in tags)


def body_hash(
    task_type: str,
    data_json: str,
    priority: int,
    tags_json: str,
    key: str,
    max_attempts: int,
    lease_seconds: float,
) -> str:
    """Fingerprint of everything that makes two submits 'the same task' (idempotency).

    Fields are joined with NUL, which JSON text, ids and requirement keys never contain.
    """
    body = "\0".join(
        (task_type, data_json, str(priority), tags_json, key, str(max_attempts),
         repr(float(lease_seconds)))
    )
    return hashlib.sha256(body.encode()).hexdigest()


@functools.lru_cache(maxsize=1024)
def _list_json(items: tuple[str, ...]) -> str:
    return json.dumps(list(items))


def list_json(items: list[str]) -> str:
    """JSON of a tags/requires list (cached: a queue sees few distinct ones)."""
    return _list_json(tuple(items))


@functools.lru_cache(maxsize=1024)
def _json_tuple(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


def json_list(text: str) -> list[str]:
    """A stored tags/requires list, decoded (cached; a fresh list on every call)."""
    return list(_json_tuple(text))


def check_cid(value: Any, name: str = "result_cid") -> str | None:
    """None, or a CID string in any base/version (InvalidCIDError otherwise)."""
    if value is None:
        return None
    from node.storage import parse_cid  # lazy: only completions that carry a CID pay for it

    try:
        parse_cid(value)
    except InvalidCIDError as exc:
        raise InvalidCIDError(f"{name}: {exc}") from None
    return value


def error_text(error: Any) -> str:
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    if len(text) > MAX_ERROR_LENGTH:
        text = text[:MAX_ERROR_LENGTH] + " [truncated]"
    return text
