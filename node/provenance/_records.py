"""Record construction: value encoding rules, large-value splitting, signing, index keys.

Record layout (one canonical DAG-JSON map; see ``_dagjson``)::

    {"type": "inference", "ts": <unix ms>, "node": "<peer id>", "seq": <n>,
     "prev": {"/": "<cid of this node's record n-1>"},      # absent for seq 0
     "input_cid": {"/": "<cid>"} | [links],                # optional
     "output_cid": {"/": "<cid>"} | [links],               # optional
     <caller fields, e.g. "model": "bert-base", "data": {...}>,
     "sig": {"/": {"bytes": "<Ed25519 signature, base64>"}}}

``sig`` signs ``SIGNING_DOMAIN + canonical(record without "sig")``. The domain prefix keeps a
record signature from ever being valid as some other message signed by the same key (the libp2p
host uses it too). The signer's public key is inside its peer id, so anyone can check a record.

Value rules (never a silent loss; anything else is an ``EncodingError`` naming the path):

* ``str``, ``bool``, ``None``, ``int`` in [-2**63, 2**64) and finite ``float`` as themselves;
  NaN and +/-Infinity are refused (JSON has no such numbers; pass them as strings if needed);
* ``bytes`` / ``bytearray`` / ``memoryview`` as dag-json bytes (they come back as ``bytes``);
* ``dict`` with ``str`` keys (a ``"/"`` key is refused: dag-json reserves it); ``list`` and
  ``tuple`` as lists (tuples come back as lists, as in any JSON);
* timezone-aware ``datetime`` -> ISO-8601 string in UTC ending in ``Z``
  (``2024-05-01T12:00:00.250000Z``); ``date`` -> ``YYYY-MM-DD``; a *naive* datetime is refused
  because its instant is unknown; datetimes come back as those strings;
* numpy arrays and numpy scalars (anything with ``dtype`` and ``tolist()``; numpy itself is not
  required) -> ``tolist()`` and then the rules above (so NaN inside an array is refused too);
* any other type (set, Decimal, objects, ...) is refused with its type name.

Large values: any value inside the caller's fields whose canonical encoding exceeds
``SPLIT_THRESHOLD`` (1 KiB) is stored as its own dag-json block and replaced by a link; this is
applied bottom-up, so a big list inside a dict is split before the dict is considered. The
``data`` map itself stays inline so its members remain indexable. A single block may not exceed
``MAX_BLOCK_SIZE`` (1 MiB, Kubo's block limit): store such data as a file and log its CID.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cid import make_cid

from node.errors import EncodingError, InvalidArgumentError, InvalidCIDError
from protocols.codec import MAX_JSON_DEPTH, json_too_deep

from ._dagjson import cid_for, dumps_wire, encode_str

SIGNING_DOMAIN = b"dsi/provenance/v1\n"
SPLIT_THRESHOLD = 1024
MAX_BLOCK_SIZE = 1 << 20
# Index keys of values longer than this are a hash of their encoding (exact equality stays exact).
_INLINE_KEY_MAX = 64

# Keys the store writes itself; callers may not use them as field names.
RESERVED = frozenset({"type", "ts", "node", "seq", "prev", "sig", "input_cid", "output_cid", "cid"})
LINK_FIELDS = ("input_cid", "output_cid")

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_SCALARS = (str, int, float, bool, type(None))


# --------------------------------------------------------------------------------------------
# CIDs given by callers
# --------------------------------------------------------------------------------------------
def parse_cid(value: Any, what: str = "cid") -> tuple[str, str]:
    """Validate a caller's CID: ``(link form, index key)``.

    The link keeps the caller's CID version (v0 stays ``Qm...``, v1 is written in base32 as
    the dag-json spec asks); the index key is always CIDv1 base32, so v0 and v1 of the same
    content find each other in queries and lineage.
    """
    if isinstance(value, bytes):
        raise InvalidCIDError(f"{what} must be a CID string, got bytes")
    if not isinstance(value, str) or not value:
        raise InvalidCIDError(f"{what} must be a CID string, got {value!r}")
    try:
        c = make_cid(value.strip())
        key = c.to_v1().encode("base32").decode("ascii") if c.version == 0 else None
        if c.version == 0:
            link = c.encode().decode("ascii")
        else:
            link = c.encode("base32").decode("ascii")
            key = link
    except Exception as exc:  # py-cid raises a zoo of types for bad input
        raise InvalidCIDError(
            f"{what} {value!r} is not a valid CID ({exc}); pass the CID string returned by "
            "add_file/log_*, e.g. 'Qm...' or 'bafy...'"
        ) from None
    return link, key


def parse_cids(value: Any, what: str) -> list[tuple[str, str]]:
    """One CID or a list of CIDs (a step with several inputs) -> list of (link, key)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidCIDError(f"{what} must not be an empty list")
        return [parse_cid(v, what) for v in value]
    return [parse_cid(value, what)]


def cid_key(value: str) -> str:
    """Index key of a CID string (CIDv1 base32); raises InvalidCIDError."""
    return parse_cid(value)[1]


# --------------------------------------------------------------------------------------------
# Values -> wire tree
# --------------------------------------------------------------------------------------------
def _format_datetime(value: _dt.datetime, path: str) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise EncodingError(
            f"{path}: naive datetime {value.isoformat()} has no timezone, so its instant is "
            "unknown; pass an aware datetime (e.g. datetime.now(timezone.utc))"
        )
    utc = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def normalize(value: Any, path: str) -> Any:
    """Caller value -> wire tree (JSON data with dag-json bytes maps), per the module rules."""
    t = type(value)
    if t is str:
        if value.isascii():
            return value  # no lone surrogate possible; skips an encode per string
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise EncodingError(f"{path}: string contains a lone surrogate (not UTF-8)") from None
        return value
    if t is bool or value is None:
        return value
    if t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise EncodingError(
                f"{path}: integer {value} is outside the 64-bit range dag-json tools accept; "
                "pass it as a string"
            )
        return value
    if t is float:
        if not math.isfinite(value):
            raise EncodingError(
                f"{path}: {value!r} is not a finite number and JSON cannot hold it; "
                "replace it (e.g. with None or the string 'nan')"
            )
        return value
    if t is dict:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                if not isinstance(k, str):
                    raise EncodingError(
                        f"{path}: map key {k!r} is a {type(k).__name__}; keys must be strings"
                    )
                k = str.__str__(k)
            if k == "/":
                raise EncodingError(f'{path}: the key "/" is reserved by dag-json for links')
            out[k] = normalize(v, f"{path}.{k}")
        return out
    if t is list or t is tuple:
        return [normalize(v, f"{path}[{i}]") for i, v in enumerate(value)]
    # --- less common types, checked in order of specificity ---------------------------------
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"/": {"bytes": base64.b64encode(bytes(value)).decode("ascii").rstrip("=")}}
    if isinstance(value, _dt.datetime):
        return _format_datetime(value, path)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if hasattr(value, "dtype") and callable(getattr(value, "tolist", None)):
        # numpy array or scalar (duck-typed: numpy is optional). tolist() gives Python values.
        return normalize(value.tolist(), path)
    if isinstance(value, str):
        return normalize(str.__str__(value), path)
    if isinstance(value, int):
        return normalize(int(value), path)
    if isinstance(value, float):
        return normalize(float(value), path)
    if isinstance(value, Mapping):
        return normalize(dict(value), path)
    if isinstance(value, (list, tuple)):
        return normalize(list(value), path)
    raise EncodingError(
        f"{path}: cannot encode a value of type {type(value).__name__} in a record; convert it "
        "to str, int, float, bool, None, bytes, list or dict (sets: a sorted list)"
    )


# --------------------------------------------------------------------------------------------
# Large values -> their own blocks
# --------------------------------------------------------------------------------------------
def _split(wire: Any, path: str, blocks: list[tuple[str, bytes]], force_inline: bool) -> Any:
    """Bottom-up: replace every value whose encoding exceeds the threshold by a link."""
    t = type(wire)
    if t is not dict and t is not list and (t is not str or len(wire) * 6 + 2 <= SPLIT_THRESHOLD):
        return wire  # numbers, bools, null and short strings can never exceed the threshold
    encoded = dumps_wire(wire)
    if len(encoded) <= SPLIT_THRESHOLD:
        return wire
    if type(wire) is dict and "/" not in wire:
        wire = {k: _split(v, f"{path}.{k}", blocks, False) for k, v in wire.items()}
    elif type(wire) is list:
        wire = [_split(v, f"{path}[{i}]", blocks, False) for i, v in enumerate(wire)]
    if force_inline:
        return wire
    encoded = dumps_wire(wire)
    if len(encoded) <= SPLIT_THRESHOLD:
        return wire
    if len(encoded) > MAX_BLOCK_SIZE:
        raise EncodingError(
            f"{path}: value encodes to {len(encoded)} bytes, over the {MAX_BLOCK_SIZE}-byte "
            "block limit; store it with FilesystemHandler.add_file and log its CID instead"
        )
    cid = cid_for(encoded)
    blocks.append((cid, encoded))
    return {"/": cid}


# --------------------------------------------------------------------------------------------
# Index keys (postings)
# --------------------------------------------------------------------------------------------
def index_value(wire: Any) -> str:
    """The string a field value is indexed under: exact equality, type-aware.

    Short values are their canonical JSON (``"bert-base"``, ``123``, ``true``); long ones a
    hash of it. Integral floats index like ints so ``150.0`` finds ``150`` (Python equality).
    """
    t = type(wire)
    if t is str:
        quoted = encode_str(wire)
        if len(quoted) <= _INLINE_KEY_MAX and quoted.isascii():
            return quoted  # the common case, without a round trip through bytes
        text = quoted.encode("utf-8")
    elif t is bool:
        return "true" if wire else "false"
    elif t is int:
        return str(wire)
    elif wire is None:
        return "null"
    elif t is float:
        if wire.is_integer() and _INT_MIN <= wire <= _INT_MAX:
            return str(int(wire))
        return float.__repr__(wire)
    else:
        text = dumps_wire(wire)
    return _index_text(text)


def data_shape(wire: dict[str, Any]) -> str:
    """The ``data`` posting of a map: its member count. ``{}#`` can never be the index value
    of any other value (canonical JSON does not continue after ``{}``), and a filter on a whole
    map is exactly "this many members, each equal" (``ProvenanceStore.query``)."""
    return f"{{}}#{len(wire)}"


def _index_text(text: bytes) -> str:
    """Index value of a value whose canonical encoding is ``text``."""
    if len(text) <= _INLINE_KEY_MAX:
        return text.decode("utf-8")
    return "#" + hashlib.sha256(text).hexdigest()[:40]


@dataclass
class Prepared:
    """Caller input validated and encoded, ready to be chained and signed under the lock."""

    record_type: str
    fields: dict[str, Any]  # wire form, large values already links
    inputs: list[tuple[str, str]]  # (link, key)
    outputs: list[tuple[str, str]]
    postings: list[tuple[str, str]]  # (key, index value), excluding type
    blocks: list[tuple[str, bytes]] = field(default_factory=list)  # split-out values


def prepare(
    record_type: str,
    fields: Mapping[str, Any] | None,
    input_cid: Any = None,
    output_cid: Any = None,
) -> Prepared:
    """Validate and encode everything that does not depend on the chain head (lock-free)."""
    if not isinstance(record_type, str) or not record_type:
        raise InvalidArgumentError(f"record type must be a non-empty string, got {record_type!r}")
    if fields is None:
        fields = {}
    if not isinstance(fields, Mapping):
        raise InvalidArgumentError(f"record fields must be a dict, got {type(fields).__name__}")
    wire_fields: dict[str, Any] = {}
    postings: list[tuple[str, str]] = []
    for key, value in fields.items():
        if not isinstance(key, str) or not key or "." in key or key == "/":
            raise InvalidArgumentError(
                f"field name {key!r} is invalid: use a non-empty string without '.'"
            )
        if key in RESERVED:
            raise InvalidArgumentError(
                f"field name {key!r} is reserved (reserved: {', '.join(sorted(RESERVED))}); "
                "pass CIDs as input_cid=/output_cid= and rename other fields"
            )
        too_deep = f"{key}: value is circular or nested more than {MAX_JSON_DEPTH} levels deep"
        try:
            wire_fields[key] = normalize(value, key)
        except RecursionError:
            raise EncodingError(too_deep) from None
        if json_too_deep(wire_fields[key]):
            raise EncodingError(too_deep)
    inputs = parse_cids(input_cid, "input_cid")
    outputs = parse_cids(output_cid, "output_cid")
    blocks: list[tuple[str, bytes]] = []
    for key, wire in list(wire_fields.items()):
        # Postings are taken after splitting, from exactly what the record holds, so an index
        # rebuilt from the blocks is identical and a filter value is keyed the same way.
        if key == "data" and type(wire) is dict:
            # A data map is indexed by its members plus its shape (see data_shape), not by a
            # hash of the whole: that posting is unique per record, so it cost a random B-tree
            # insert each -- half the index work at 1M records -- for a rarely used filter.
            wire = _split(wire, key, blocks, force_inline=True)
            wire_fields[key] = wire
            postings.append((key, data_shape(wire)))
            postings.extend((f"data.{dk}", index_value(dv)) for dk, dv in wire.items())
            continue
        encoded = dumps_wire(wire) if type(wire) is dict or type(wire) is list else None
        if encoded is not None and len(encoded) <= SPLIT_THRESHOLD:
            # What _split would decide (kept as it is), indexed by the encoding it needed.
            postings.append((key, _index_text(encoded)))
        else:
            wire = _split(wire, key, blocks, force_inline=(key == "data"))
            wire_fields[key] = wire
            postings.append((key, index_value(wire)))
    for role, items in (("input_cid", inputs), ("output_cid", outputs)):
        postings.extend((role, k) for _, k in items)
    return Prepared(record_type, wire_fields, inputs, outputs, postings, blocks)


def filter_key(field_name: str, value: Any) -> str:
    """Index value a filter on ``field_name`` (``model``, ``data.hardware``, ``data``) looks up.

    The filter value goes through the same normalisation and splitting as a record value, so a
    large value is matched by the link its record holds.
    """
    wire = normalize(value, field_name)
    wire = _split(wire, field_name, [], force_inline=(field_name == "data"))
    return index_value(wire)


def data_filter(value: Any) -> list[tuple[str, str]]:
    """Postings that together match ``data == value``: for a map, its shape and every member
    (see ``data_shape``); otherwise the value itself."""
    wire = normalize(value, "data")
    wire = _split(wire, "data", [], force_inline=True)
    if type(wire) is dict:
        return [("data", data_shape(wire)),
                *((f"data.{k}", index_value(v)) for k, v in wire.items())]
    return [("data", index_value(wire))]


def _links(items: list[tuple[str, str]]) -> Any:
    links = [{"/": link} for link, _ in items]
    return links[0] if len(links) == 1 else links


def build_record(
    prepared: Prepared,
    *,
    node: str,
    seq: int,
    ts: int,
    prev: str | None,
    sign: Callable[[bytes], bytes],
) -> tuple[str, bytes]:
    """Chain and sign a prepared record: ``(cid, canonical bytes)``."""
    record: dict[str, Any] = dict(prepared.fields)
    record["type"] = prepared.record_type
    record["ts"] = ts
    record["node"] = node
    record["seq"] = seq
    if prev is not None:
        record["prev"] = {"/": prev}
    if prepared.inputs:
        record["input_cid"] = _links(prepared.inputs)
    if prepared.outputs:
        record["output_cid"] = _links(prepared.outputs)
    # Canonical order is sorted keys, so the signed record is the unsigned one with the
    # ``sig`` entry spliced in between the keys below and above "sig": encode the two halves
    # once and build both byte strings from them instead of encoding the record twice.
    low: dict[str, Any] = {}
    high: dict[str, Any] = {}
    for key, value in record.items():
        (low if key < "sig" else high)[key] = value
    lo = dumps_wire(low)[1:-1]
    hi = dumps_wire(high)[1:-1]
    unsigned = b"{" + lo + b"," + hi + b"}" if lo and hi else b"{" + lo + hi + b"}"
    signature = sign(SIGNING_DOMAIN + unsigned)
    sig = b'"sig":{"/":{"bytes":"' + base64.b64encode(signature).rstrip(b"=") + b'"}}'
    data = b"{" + (lo + b"," if lo else b"") + sig + (b"," + hi if hi else b"") + b"}"
    if len(data) > MAX_BLOCK_SIZE:
        raise EncodingError(
            f"record encodes to {len(data)} bytes, over the {MAX_BLOCK_SIZE}-byte block limit; "
            "nest its many fields in fewer values"
        )
    return cid_for(data), data


def signing_message(record: Mapping[str, Any]) -> bytes:
    """What ``sig`` signs, recomputed from a decoded record (``_dagjson`` Link/bytes form)."""
    from ._dagjson import encode

    unsigned = {k: v for k, v in record.items() if k != "sig"}
    return SIGNING_DOMAIN + encode(unsigned)


def link_keys(value: Any) -> list[str]:
    """Index keys of a decoded ``input_cid``/``output_cid`` value (a Link or list of Links)."""
    if value is None:
        return []
    items: Iterable[Any] = value if isinstance(value, list) else [value]
    return [cid_key(str(v)) for v in items]


def postings_of(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Postings of a decoded record (index rebuild): the same keys ``prepare`` produced."""
    from ._dagjson import to_wire

    out: list[tuple[str, str]] = []
    for key, value in record.items():
        if key in RESERVED:
            continue
        wire = to_wire(value)
        if key == "data" and type(wire) is dict:
            out.append((key, data_shape(wire)))
            out.extend((f"data.{k}", index_value(v)) for k, v in wire.items())
            continue
        out.append((key, index_value(wire)))
    for role in LINK_FIELDS:
        out.extend((role, k) for k in link_keys(record.get(role)))
    return out
