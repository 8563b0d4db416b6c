"""Canonical DAG-JSON, record value rules, large-value splitting and signing (no I/O)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math

import multihash
import pytest
from cid import make_cid

from node.errors import EncodingError, InvalidArgumentError, InvalidCIDError
from node.identity import Identity, verify_signature
from node.provenance import Link, cid_for, decode, encode
from node.provenance._dagjson import DecodeError, decode_canonical
from node.provenance._records import (
    SIGNING_DOMAIN,
    SPLIT_THRESHOLD,
    build_record,
    filter_key,
    normalize,
    parse_cid,
    postings_of,
    prepare,
    signing_message,
)
from protocols.codec import MAX_JSON_DEPTH

EMPTY_V0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
EMPTY_V1_RAW = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
HELLO_V0 = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


def test_cid_for_matches_py_cid() -> None:
    for data in (b"", b"{}", b'{"a":1}', bytes(range(256)) * 10):
        expected = make_cid(
            1, "dag-json", multihash.encode(hashlib.sha256(data).digest(), "sha2-256")
        ).encode("base32").decode()
        assert cid_for(data) == expected
        assert expected.startswith("bagu")


def test_canonical_encoding_sorts_keys_by_utf8_bytes_without_whitespace() -> None:
    value = {"b": 1, "a": [True, None, 1.5], "é": "x", "Z": {"y": 2, "x": 3}, "\U0001f600": 0}
    out = encode(value)
    assert out == '{"Z":{"x":3,"y":2},"a":[true,null,1.5],"b":1,"é":"x","\U0001f600":0}'.encode()
    keys = [k.encode() for k in json.loads(out)]
    assert keys == sorted(keys)


def test_links_and_bytes_round_trip_in_dag_json_form() -> None:
    value = {"link": Link(HELLO_V0), "raw": b"\x00\xffhello", "empty": b""}
    out = encode(value)
    assert b'"link":{"/":"' + HELLO_V0.encode() + b'"}' in out
    assert b'"raw":{"/":{"bytes":"AP9oZWxsbw"}}' in out  # base64, no padding
    assert b'"empty":{"/":{"bytes":""}}' in out
    back = decode(out)
    assert back == value
    assert isinstance(back["link"], Link) and back["link"] == HELLO_V0
    assert isinstance(back["raw"], bytes)


def test_decode_canonical_refuses_non_canonical_bytes() -> None:
    assert decode_canonical(b'{"a":1,"b":2}') == {"a": 1, "b": 2}
    for bad in (b'{"b":2,"a":1}', b'{"a": 1}', b'{"a":1,"a":1}', b'{"a":1E2}', b'{"a":NaN}',
                b'{"/":"x","y":1}', b'{"a":{"/":{"bytes":"AA=="}}}'):
        with pytest.raises(DecodeError):
            decode_canonical(bad)


def test_value_rules_bytes_datetime_tuple_numpy_like() -> None:
    class ArrayLike:  # what the rule duck-types on (dtype + tolist()); numpy is optional
        dtype = "float32"

        def tolist(self) -> list[float]:
            return [0.5, 0.25]

    when = dt.datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    wire = normalize(
        {"b": b"\x01", "t": when, "d": dt.date(2024, 5, 1), "tup": (1, 2), "arr": ArrayLike()},
        "data",
    )
    assert wire == {
        "b": {"/": {"bytes": "AQ"}},
        "t": "2024-05-01T12:00:00.250000Z",
        "d": "2024-05-01",
        "tup": [1, 2],
        "arr": [0.5, 0.25],
    }


def test_numpy_arrays_when_numpy_is_installed() -> None:
    np = pytest.importorskip("numpy")
    assert normalize(np.array([[1, 2], [3, 4]], dtype=np.int64), "x") == [[1, 2], [3, 4]]
    assert normalize(np.float32(0.5), "x") == 0.5
    with pytest.raises(EncodingError, match="finite"):
        normalize(np.array([1.0, np.nan]), "data.emb")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "data.x: nan is not a finite number"),
        (math.inf, "not a finite number"),
        ([1.0, -math.inf], r"data.x\[1\]"),
        ({1, 2}, "type set"),
        (dt.datetime(2024, 1, 1), "naive datetime"),
        (2**64, "64-bit range"),
        ({1: "a"}, "keys must be strings"),
        ({"/": "x"}, "reserved by dag-json"),
        (object(), "type object"),
        ("\ud800", "lone surrogate"),
    ],
)
def test_values_json_cannot_hold_raise_encoding_error(value: object, message: str) -> None:
    with pytest.raises(EncodingError, match=message):
        normalize(value, "data.x")


def test_encoding_error_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        prepare("inference", {"model": "m", "data": {"x": math.nan}})


def test_field_nesting_limit_is_exact() -> None:
    """As deep as MAX_JSON_DEPTH is kept; one more level, or a cycle, is a clear error."""
    def nested(depth: int) -> object:
        value: object = 1
        for _ in range(depth):
            value = [value]
        return value

    prepare("event", {"x": nested(MAX_JSON_DEPTH)})
    for bad in (nested(MAX_JSON_DEPTH + 1), nested(5000)):
        with pytest.raises(EncodingError, match=f"x: value is circular or nested more than "
                                                 f"{MAX_JSON_DEPTH} levels deep"):
            prepare("event", {"x": bad})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(EncodingError, match="circular"):
        prepare("event", {"x": loop})


def test_reserved_and_invalid_field_names() -> None:
    for name in ("type", "sig", "prev", "seq", "cid", "a.b", ""):
        with pytest.raises(InvalidArgumentError):
            prepare("inference", {name: 1})
    with pytest.raises(InvalidArgumentError):
        prepare("", {})


def test_cids_keep_their_version_and_index_as_v1() -> None:
    link, key = parse_cid(EMPTY_V0)
    assert link == EMPTY_V0
    assert key == make_cid(EMPTY_V0).to_v1().encode("base32").decode()
    link1, key1 = parse_cid(EMPTY_V1_RAW)
    assert link1 == key1 == EMPTY_V1_RAW
    base58_v1 = make_cid(EMPTY_V1_RAW).encode("base58btc").decode()
    assert parse_cid(base58_v1) == (EMPTY_V1_RAW, EMPTY_V1_RAW)
    for bad in ("Qm...", "", "hello", None, 12, b"Qm"):
        with pytest.raises(InvalidCIDError):
            parse_cid(bad)


def test_large_values_are_split_bottom_up_and_data_stays_inline() -> None:
    embedding = [i / 1000 + 0.0001 for i in range(768)]
    prepared = prepare(
        "inference",
        {"model": "bert", "data": {"input": "hi", "output_embedding": embedding,
                                   "nested": {"big": "x" * 5000, "small": 1}}},
    )
    data = prepared.fields["data"]
    assert data["input"] == "hi"
    emb_link = data["output_embedding"]["/"]
    big_link = data["nested"]["big"]["/"]
    assert data["nested"]["small"] == 1
    blocks = dict(prepared.blocks)
    assert set(blocks) == {emb_link, big_link}
    assert decode(blocks[emb_link]) == embedding
    assert decode(blocks[big_link]) == "x" * 5000
    for cid, block in blocks.items():
        assert cid_for(block) == cid and len(block) > SPLIT_THRESHOLD
    # a filter on the large value finds the record's posting (the link, by content)
    postings = dict(prepared.postings)
    assert postings["data.output_embedding"] == filter_key("data.output_embedding", embedding)
    assert postings["model"] == filter_key("model", "bert") == '"bert"'


def test_too_large_values_are_refused_with_a_hint() -> None:
    with pytest.raises(EncodingError, match="add_file"):
        prepare("inference", {"data": {"blob": b"\x00" * (2 << 20)}})


def test_integral_floats_index_like_ints_but_bools_do_not() -> None:
    assert filter_key("data.x", 150) == filter_key("data.x", 150.0) == "150"
    assert filter_key("data.x", True) == "true" != filter_key("data.x", 1)
    assert filter_key("data.x", "123") != filter_key("data.x", 123)


def test_build_record_signature_covers_everything_but_sig() -> None:
    ident = Identity(seed=bytes(range(32)))
    prepared = prepare(
        "transformation", {"operation": "tok", "data": {"n": 1}},
        input_cid=HELLO_V0, output_cid=[EMPTY_V1_RAW, EMPTY_V0],
    )
    prev = cid_for(b"{}")
    cid, data = build_record(
        prepared, node=ident.peer_id, seq=7, ts=1_700_000_000_000, prev=prev, sign=ident.sign
    )
    assert cid == cid_for(data)
    record = decode_canonical(data)
    assert record["prev"] == prev and isinstance(record["prev"], Link)
    assert record["input_cid"] == HELLO_V0
    assert record["output_cid"] == [EMPTY_V1_RAW, EMPTY_V0]
    assert record["seq"] == 7 and record["node"] == ident.peer_id
    message = signing_message(record)
    assert message.startswith(SIGNING_DOMAIN)
    assert verify_signature(ident.peer_id, message, record["sig"])
    tampered = dict(record, seq=8)
    assert not verify_signature(ident.peer_id, signing_message(tampered), record["sig"])
    # an index rebuilt from the block has the same postings as the write path
    assert sorted(postings_of(record)) == sorted(prepared.postings)


def test_build_record_splices_sig_in_canonical_order_for_any_field_names() -> None:
    # build_record encodes the keys below and above "sig" separately and splices the signature
    # in between; whatever the field names, the bytes must be the one canonical encoding.
    ident = Identity(seed=bytes(range(32)))
    names = ["a", "s", "si", "sif", "sih", "sig0", "sigz", "Z", "é", "\U0001f600", "zz"]
    for i in range(len(names) + 1):
        fields = {name: {"v": n} for n, name in enumerate(names[:i])}
        cid, data = build_record(
            prepare("t", fields), node=ident.peer_id, seq=i, ts=i, prev=None, sign=ident.sign
        )
        record = decode_canonical(data)  # raises unless the bytes are canonical
        assert cid == cid_for(data) and encode(record) == data
        assert verify_signature(ident.peer_id, signing_message(record), record["sig"])


def test_cid_for_matches_py_cid_on_many_digests() -> None:
    for n in range(300):
        data = hashlib.sha256(str(n).encode()).digest() * (n % 5)
        expected = make_cid(
            1, "dag-json", multihash.encode(hashlib.sha256(data).digest(), "sha2-256")
        ).encode("base32").decode()
        assert cid_for(data) == expected
