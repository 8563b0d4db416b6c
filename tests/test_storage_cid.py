"""CID parsing/formatting (fast paths cross-checked against py-cid) and canonical dag-pb bytes."""

from __future__ import annotations

import hashlib
import random

import cid as pycid
import multihash
import pytest

from node.errors import InvalidCIDError
from node.storage import CID, format_cid, parse_cid
from node.storage._cid import cid_from_binary
from node.storage._dagpb import (
    DIRECTORY,
    FILE,
    PBLink,
    UnixFSData,
    decode_node,
    decode_unixfs,
    encode_node,
    encode_unixfs,
    file_leaf_parts,
)


@pytest.mark.parametrize("codec", ["raw", "dag-pb", "dag-json"])
def test_format_and_parse_agree_with_py_cid(codec: str) -> None:
    rnd = random.Random(7)
    for _ in range(200):
        digest = rnd.randbytes(32)
        mh = multihash.encode(digest, "sha2-256")
        ref_v1 = pycid.CIDv1(codec, mh).encode("base32").decode()
        assert format_cid(1, codec, digest) == ref_v1
        assert parse_cid(ref_v1) == CID(1, codec, digest)
        # any other base goes through py-cid and names the same block
        b58 = pycid.CIDv1(codec, mh).encode("base58btc").decode()
        assert parse_cid(b58) == CID(1, codec, digest)
        assert cid_from_binary(pycid.CIDv1(codec, mh).buffer) == CID(1, codec, digest)
        if codec == "dag-pb":
            ref_v0 = str(pycid.CIDv0(mh))
            assert format_cid(0, "dag-pb", digest) == ref_v0
            parsed = parse_cid(ref_v0)
            assert parsed == CID(0, "dag-pb", digest)
            assert parsed.to_v1().digest == parsed.digest  # v0 and v1: the same block


@pytest.mark.parametrize(
    "bad",
    ["", "Qm...", "hello", "bafyinvalid", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff50",
     "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5",
     "zzzz", "bafkqaaa"],
)
def test_invalid_cid_strings(bad: str) -> None:
    with pytest.raises(InvalidCIDError):
        parse_cid(bad)


def test_non_sha256_and_non_string_are_refused() -> None:
    blake = pycid.CIDv1("raw", multihash.digest(b"x", "blake2b-256").encode()).encode("base32")
    with pytest.raises(InvalidCIDError, match="sha2-256"):
        parse_cid(blake.decode())
    with pytest.raises(InvalidCIDError):
        parse_cid(123)  # type: ignore[arg-type]


def test_known_vectors_parse() -> None:
    v0 = parse_cid("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH")
    # the empty UnixFS file node is 0a 04 08 02 18 00
    assert hashlib.sha256(bytes.fromhex("0a0408021800")).digest() == v0.digest
    raw = parse_cid("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
    assert raw.digest == hashlib.sha256(b"").digest()


def test_dag_pb_is_canonical_links_before_data() -> None:
    child = CID(0, "dag-pb", hashlib.sha256(b"child").digest())
    data = encode_unixfs(UnixFSData(DIRECTORY))
    block = encode_node([PBLink(child.binary(), "a", 10)], data)
    assert block[0] == 0x12  # field 2 (Links) comes first
    assert block.endswith(b"\x0a\x02\x08\x01")  # then field 1 (Data)
    node = decode_node(block)
    assert node.links[0].name == "a" and node.links[0].tsize == 10
    assert bytes(node.data or b"") == data
    # the empty directory vector
    empty = encode_node([], data)
    assert format_cid(0, "dag-pb", hashlib.sha256(empty).digest()) == (
        "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
    )


@pytest.mark.parametrize("n", [0, 1, 127, 128, 16383, 16384, 262144])
def test_leaf_parts_equal_full_encoding(n: int) -> None:
    chunk = random.Random(n).randbytes(n)
    head, tail = file_leaf_parts(n)
    full = encode_node([], encode_unixfs(UnixFSData(FILE, data=chunk, filesize=n)))
    assert head + chunk + tail == full
    u = decode_unixfs(decode_node(full).data or b"")
    assert u.type == FILE and u.filesize == n and bytes(u.data or b"") == chunk
