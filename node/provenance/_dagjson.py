"""Canonical DAG-JSON (IPLD codec ``dag-json``, multicodec 0x0129) encode and decode.

The encoding is the one the IPLD dag-json spec calls canonical, and it is what a record's CID
and signature are computed over, so it must be byte-for-byte reproducible:

* map keys sorted by their UTF-8 bytes (Python's code-point order is the same order), no
  whitespace, strings as UTF-8 with only the escapes JSON requires;
* a link is ``{"/": "<cid>"}``, bytes are ``{"/": {"bytes": "<base64, standard alphabet, no
  padding>"}}``; a map with a ``"/"`` key is therefore never plain data;
* integers exact (kept within signed/unsigned 64-bit by ``_records``); floats finite only,
  written as Python's shortest round-trip ``repr`` (``0.1``, ``5.0``, ``1e-07``).

Python values on the decoded side: links are :class:`Link` (a ``str`` subclass, so they compare
equal to the CID string), bytes are ``bytes``. The "wire" side is plain JSON data with the
``{"/": ...}`` maps spelled out; ``_records`` builds wire trees directly so that encoding is one
C-speed ``json.dumps`` call.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from node.errors import ProvenanceError

DAG_JSON_CODEC = 0x0129
# CIDv1 prefix: version 1, codec varint(0x0129) = a9 02, multihash sha2-256 (0x12), 32 bytes.
_CID_PREFIX = bytes([0x01, 0xA9, 0x02, 0x12, 0x20])
_CID_B32_PREFIX = "b" + base64.b32encode(_CID_PREFIX).decode("ascii").lower()
RECORD_CID_PREFIX = _CID_B32_PREFIX  # every record CID (dag-json, sha2-256, CIDv1 base32) starts so
_B32_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_B32_PAIRS = [a + b for a in _B32_ALPHABET for b in _B32_ALPHABET]
_B32_SHIFTS = tuple(range(250, -1, -10))
_sha256 = hashlib.sha256
_from_bytes = int.from_bytes

_dumps = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
).encode


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not dag-json data")


# The C encoder that ``JSONEncoder.encode`` builds on every call, built once (~25% faster on
# the hot path). Same settings as ``_dumps``, which remains the fallback.
_c_iterencode = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None, _not_json, json.encoder.c_encode_basestring,  # type: ignore[attr-defined]
        None, ":", ",", True, False, False,
    )
    if getattr(json.encoder, "c_make_encoder", None) is not None
    and getattr(json.encoder, "c_encode_basestring", None) is not None
    else None
)
encode_str = json.encoder.encode_basestring  # JSON string literal, non-ASCII kept as is


class DecodeError(ProvenanceError):
    """Bytes that are not valid (or not canonical) DAG-JSON."""


class Link(str):
    """An IPLD link: the CID string of the target. Compares equal to that string."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Link({str.__repr__(self)})"


def cid_for(data: bytes) -> str:
    """CIDv1 (base32, ``bagu...``) of ``data`` as a dag-json block, sha2-256.

    Hand-assembled because this is on the hot path (py-cid takes ~65 us per CID, this ~1 us);
    tests check it against py-cid.
    """
    # The 5-byte prefix is exactly 8 base32 characters, so the digest encodes on its own:
    # 256 bits + 4 zero bits = 26 groups of 10 bits, each two characters from a table (half
    # the cost of base64.b32encode, which is pure Python).
    n = _from_bytes(_sha256(data).digest(), "big") << 4
    return _CID_B32_PREFIX + "".join([_B32_PAIRS[(n >> s) & 1023] for s in _B32_SHIFTS])


def cid_digest(cid: str) -> bytes:
    """The sha2-256 digest inside a CIDv1 base32 string made by :func:`cid_for`."""
    body = cid[1:].upper()
    raw = base64.b32decode(body + "=" * (-len(body) % 8))
    return raw[-32:]


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64decode(text: str) -> bytes:
    if "=" in text:
        raise DecodeError("dag-json bytes must be unpadded base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError as exc:
        raise DecodeError(f"invalid base64 in dag-json bytes: {exc}") from None


def link_wire(cid: str) -> dict[str, str]:
    return {"/": cid}


def bytes_wire(data: bytes) -> dict[str, dict[str, str]]:
    return {"/": {"bytes": b64encode(data)}}


def dumps_list(items: list[Any]) -> str:
    """Compact JSON text of a list of plain values (index postings), with the cached encoder:
    ``json.dumps`` with non-default options builds a new encoder per call (~4x slower)."""
    if _c_iterencode is not None:
        return "".join(_c_iterencode(items, 0))
    return _dumps(items)


def dumps_wire(wire: Any) -> bytes:
    """Canonical bytes of a wire tree (plain JSON data with ``{"/": ...}`` maps spelled out)."""
    if _c_iterencode is not None and (type(wire) is dict or type(wire) is list):
        return "".join(_c_iterencode(wire, 0)).encode("utf-8")
    return _dumps(wire).encode("utf-8")


def to_wire(value: Any) -> Any:
    """Decoded Python value (Link, bytes, dict, list, scalars) -> wire tree."""
    if isinstance(value, Link):
        return {"/": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes_wire(bytes(value))
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def encode(value: Any) -> bytes:
    """Canonical DAG-JSON bytes of a decoded-side value (Links, bytes, JSON data)."""
    try:
        return dumps_wire(to_wire(value))
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"value cannot be encoded as dag-json: {exc}") from None


def _hook(obj: dict[str, Any]) -> Any:
    if "/" not in obj:
        return obj
    if len(obj) == 1:
        inner = obj["/"]
        if type(inner) is str:
            return Link(inner)
        if type(inner) is dict and len(inner) == 1 and type(inner.get("bytes")) is str:
            return b64decode(inner["bytes"])
    raise DecodeError('a map with a "/" key must be exactly a link or a bytes value')


def _bad_constant(name: str) -> Any:
    raise DecodeError(f"{name} is not allowed in dag-json")


# One decoder for all calls: json.loads with hooks builds a new one each time, which was
# a third of the cost of decoding a record (100 of them per query).
_decode_text = json.JSONDecoder(object_hook=_hook, parse_constant=_bad_constant).decode


def decode(data: bytes) -> Any:
    """Decode DAG-JSON bytes (links -> :class:`Link`, bytes -> ``bytes``)."""
    try:
        return _decode_text(data.decode("utf-8"))
    except DecodeError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not valid dag-json: {exc}") from None


def decode_canonical(data: bytes) -> Any:
    """Decode and insist the bytes are exactly the canonical encoding of the result.

    Catches duplicate keys, unsorted keys, whitespace, non-canonical numbers or escapes: two
    different byte strings must never be accepted as the same record.
    """
    value = decode(data)
    if encode(value) != data:
        raise DecodeError("bytes are not canonical dag-json (key order, spacing or number form)")
    return value
