"""Signed, hash-chained, queryable provenance records (IPLD dag-json blocks + SQLite index).

See ``_records`` for the record layout and value rules, ``_store`` for the write protocol and
its crash safety, ``_schema`` for the index and durability setting, ``_prov`` for PROV-JSON.
"""

from ._dagjson import DAG_JSON_CODEC, Link, cid_for, decode, encode
from ._prov import to_prov_json
from ._records import MAX_BLOCK_SIZE, SIGNING_DOMAIN, SPLIT_THRESHOLD
from ._store import ProvenanceStore


def to_jsonable(value: object) -> object:
    """A decoded record (or any value from it) as plain JSON data: links become their CID
    string, bytes the dag-json ``{"/": {"bytes": ...}}`` form. For printing and HTTP APIs."""
    from ._dagjson import bytes_wire

    if isinstance(value, Link):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes_wire(bytes(value))
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


__all__ = [
    "DAG_JSON_CODEC",
    "MAX_BLOCK_SIZE",
    "SIGNING_DOMAIN",
    "SPLIT_THRESHOLD",
    "Link",
    "ProvenanceStore",
    "cid_for",
    "decode",
    "encode",
    "to_jsonable",
    "to_prov_json",
]
