"""verify() against real tampering: the block store's and the index's SQLite files are edited
directly, the way an attacker (or a disk) would, and verify must name the CID that breaks."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfs_accelerate_py.datasets_integration import ProvenanceLogger
from node.errors import ProvenanceError, VerificationError
from node.identity import Identity, verify_signature
from node.provenance import cid_for, decode, encode
from node.provenance._journal import HEADER, MAGIC
from node.provenance._records import build_record, prepare
from node.storage import CODECS, parse_cid


def _dead_api() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}"


@pytest.fixture
def config(cache_dir: Path) -> dict[str, Any]:
    return {"cache_dir": str(cache_dir), "ipfs_api": _dead_api()}


@pytest.fixture
def chain(config: dict[str, Any]) -> Iterator[tuple[ProvenanceLogger, list[str]]]:
    """A logger with a 6-record chain, fully caught up (blocks and index written)."""
    with ProvenanceLogger(config) as lg:
        cids = [lg.log_inference("bert-base", {"i": i, "hardware": "CUDA"}) for i in range(6)]
        lg.services.provenance.catch_up()
        assert lg.verify()["records"] == 6
        yield lg, cids


def _blocks_db(lg: ProvenanceLogger) -> sqlite3.Connection:
    return sqlite3.connect(lg.config.blocks_dir / "index.sqlite", isolation_level=None)


def _index_db(lg: ProvenanceLogger) -> sqlite3.Connection:
    return sqlite3.connect(lg.config.provenance_db, isolation_level=None)


def _digest(cid: str) -> bytes:
    return parse_cid(cid).digest


def _raw_put(lg: ProvenanceLogger, data: bytes) -> str:
    """Write a block row straight into the block store's SQLite (no API involved)."""
    cid = cid_for(data)
    with _blocks_db(lg) as db:
        db.execute("INSERT OR REPLACE INTO blocks(digest, codec, size, data) VALUES (?,?,?,?)",
                   (_digest(cid), CODECS["dag-json"], len(data), data))
    return cid


def _replace_index_row(lg: ProvenanceLogger, seq: int, cid: str, data: bytes) -> None:
    with _index_db(lg) as db:
        db.execute("UPDATE records SET cid=?, body=? WHERE node=? AND seq=?",
                   (cid, data, lg.services.peer_id, seq))


def _resign(record: dict[str, Any], identity: Identity | None, **changes: Any) -> bytes:
    """Re-encode a decoded record with changes, signed by ``identity`` (or keeping its sig)."""
    from node.provenance._records import signing_message

    rec = {k: v for k, v in record.items() if k != "sig"}
    rec.update(changes)
    sig = identity.sign(signing_message(rec)) if identity is not None else record["sig"]
    return encode({**rec, "sig": sig})


def test_edited_record_bytes_are_detected(chain: tuple[ProvenanceLogger, list[str]]) -> None:
    lg, cids = chain
    victim = cids[2]
    data = lg.services.local_blocks.get(victim)
    edited = data.replace(b'"CUDA"', b'"CPU!"')
    with _blocks_db(lg) as db:
        db.execute("UPDATE blocks SET data=? WHERE digest=?", (edited, _digest(victim)))
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == victim and "edited" in exc.value.detail
    with pytest.raises(VerificationError) as one:
        lg.verify(victim)
    assert one.value.cid == victim
    lg.verify(cids[3])  # the others still verify one by one


def test_edited_and_rehashed_record_fails_its_signature(
    chain: tuple[ProvenanceLogger, list[str]],
) -> None:
    lg, cids = chain
    record = decode(lg.services.local_blocks.get(cids[5]))
    forged = _resign(record, None, model="gpt-evil")  # keeps the old signature
    fcid = _raw_put(lg, forged)
    _replace_index_row(lg, 5, fcid, forged)
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == fcid and "bad signature" in exc.value.detail


def test_record_signed_by_another_key_is_detected(
    chain: tuple[ProvenanceLogger, list[str]],
) -> None:
    lg, cids = chain
    attacker = Identity(seed=b"\x07" * 32)
    record = decode(lg.services.local_blocks.get(cids[5]))
    forged = _resign(record, attacker, model="gpt-evil")  # valid sig, wrong signer
    fcid = _raw_put(lg, forged)
    _replace_index_row(lg, 5, fcid, forged)
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == fcid and "bad signature" in exc.value.detail
    # the attacker claiming the record as its own is caught as a foreign record in our chain
    own = _resign(record, attacker, node=attacker.peer_id)
    ocid = _raw_put(lg, own)
    _replace_index_row(lg, 5, ocid, own)
    with pytest.raises(VerificationError) as exc2:
        lg.verify()
    assert exc2.value.cid == ocid and "not by" in exc2.value.detail, str(exc2.value)


def test_removed_record_is_detected(chain: tuple[ProvenanceLogger, list[str]]) -> None:
    lg, cids = chain
    victim = cids[3]
    with _blocks_db(lg) as db:
        db.execute("DELETE FROM blocks WHERE digest=?", (_digest(victim),))
    with _index_db(lg) as db:
        db.execute("DELETE FROM records WHERE cid=?", (victim,))
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == victim
    assert "missing" in exc.value.detail and cids[4] in exc.value.detail


def test_record_removed_from_the_index_only_is_detected(
    chain: tuple[ProvenanceLogger, list[str]],
) -> None:
    lg, cids = chain
    with _index_db(lg) as db:
        db.execute("DELETE FROM records WHERE cid=?", (cids[1],))
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == cids[1] and "index" in exc.value.detail


def test_reordered_index_is_detected(chain: tuple[ProvenanceLogger, list[str]]) -> None:
    lg, cids = chain
    node = lg.services.peer_id
    with _index_db(lg) as db:  # swap the positions of records 2 and 3
        db.execute("UPDATE records SET seq=-1 WHERE node=? AND seq=2", (node,))
        db.execute("UPDATE records SET seq=2 WHERE node=? AND seq=3", (node,))
        db.execute("UPDATE records SET seq=3 WHERE node=? AND seq=-1", (node,))
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == cids[3] and "index" in exc.value.detail


def test_reordered_signed_chain_is_detected(config: dict[str, Any]) -> None:
    """Records validly signed by the node itself, linked out of order: seq must step by 1."""
    with ProvenanceLogger(config) as lg:
        ident = lg.services.identity
        genesis = lg.log_inference("m", {"i": 0})
        lg.services.provenance.catch_up()
        ts = lg.get_record(genesis)["ts"]

        def signed(seq: int, prev: str) -> tuple[str, bytes]:
            return build_record(prepare("inference", {"model": "m", "data": {"i": seq}}),
                                node=ident.peer_id, seq=seq, ts=ts + seq, prev=prev,
                                sign=ident.sign)

        # record 2 written before record 1: genesis <- "seq 2" <- "seq 1" (the head)
        c2, d2 = signed(2, genesis)
        c1, d1 = signed(1, c2)
        for c, d, s in ((c2, d2, 2), (c1, d1, 1)):
            assert _raw_put(lg, d) == c
            with _index_db(lg) as db:
                db.execute(
                    "INSERT INTO records (cid, node, seq, type, ts, body) VALUES (?,?,?,?,?,?)",
                    (c, ident.peer_id, s, "inference", ts + s, d))
        with pytest.raises(VerificationError) as exc:
            lg.verify()
        assert exc.value.cid in (c1, c2) and "reordered" in exc.value.detail


def test_bad_signature_bytes_are_detected(chain: tuple[ProvenanceLogger, list[str]]) -> None:
    lg, cids = chain
    record = decode(lg.services.local_blocks.get(cids[4]))
    bad = bytes([record["sig"][0] ^ 1]) + record["sig"][1:]
    forged = encode({**record, "sig": bad})
    fcid = _raw_put(lg, forged)
    _replace_index_row(lg, 4, fcid, forged)
    with pytest.raises(VerificationError) as exc:
        lg.verify(fcid)
    assert exc.value.cid == fcid and "bad signature" in exc.value.detail
    with pytest.raises(VerificationError) as chain_exc:
        lg.verify()
    # record 5 still links to the genuine record 4, which the index no longer names
    assert chain_exc.value.cid in (cids[4], fcid)


def test_index_copy_that_differs_from_the_block_is_detected(
    chain: tuple[ProvenanceLogger, list[str]],
) -> None:
    lg, cids = chain
    with _index_db(lg) as db:
        db.execute("UPDATE records SET body=? WHERE cid=?", (b"{}", cids[0]))
    with pytest.raises(VerificationError) as exc:
        lg.verify()
    assert exc.value.cid == cids[0] and "index copy" in exc.value.detail


def test_missing_split_out_value_names_its_record(config: dict[str, Any]) -> None:
    with ProvenanceLogger(config) as lg:
        cid = lg.log_inference("m", {"embedding": [i / 7 for i in range(768)]})
        lg.services.provenance.catch_up()
        link = str(lg.get_record(cid, resolve=False)["data"]["embedding"])
        with _blocks_db(lg) as db:
            db.execute("DELETE FROM blocks WHERE digest=?", (_digest(link),))
        with pytest.raises(VerificationError) as exc:
            lg.verify()
        assert exc.value.cid == cid and link in exc.value.detail


def test_torn_journal_tail_is_cut_and_the_chain_continues(config: dict[str, Any]) -> None:
    with ProvenanceLogger(config) as lg:
        first = [lg.log_inference("m", {"i": i}) for i in range(3)]
        journal = Path(str(lg.config.provenance_db) + ".journal")
    # After a power loss the tail of the journal can be garbage; cut it, keep the rest.
    with open(journal, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage-that-is-not-an-entry")
    with ProvenanceLogger(config) as lg:
        more = [lg.log_inference("m", {"i": i}) for i in range(3, 6)]
        assert lg.verify()["records"] == 6
        assert [r["cid"] for r in lg.query_logs({"model": "m"}, limit=None)] == (
            first + more)[::-1]


def test_rotation_interrupted_between_truncate_and_bump_is_recovered(
    config: dict[str, Any],
) -> None:
    with ProvenanceLogger(config) as lg:
        first = [lg.log_inference("m", {"i": i}) for i in range(4)]
        lg.services.provenance.catch_up()  # absorbs the journal and bumps its generation
        journal = Path(str(lg.config.provenance_db) + ".journal")
        gen = int.from_bytes(journal.read_bytes()[8:16], "big")
    # Recreate the crash state: truncated, but the generation not bumped yet.
    with _index_db_path(config) as db:
        db.execute("UPDATE meta SET value=? WHERE key='journal'", (f"{gen - 1}:{HEADER + 999}",))
    journal.write_bytes(MAGIC + (gen - 1).to_bytes(8, "big"))
    with ProvenanceLogger(config) as lg:
        nxt = lg.log_inference("m", {"i": 4})
        assert lg.get_record(nxt)["prev"] == first[-1]
        assert lg.verify()["records"] == 5


def _index_db_path(config: dict[str, Any]) -> sqlite3.Connection:
    return sqlite3.connect(Path(config["cache_dir"]) / "provenance.sqlite", isolation_level=None)


def test_replayed_entry_is_skipped_and_a_forked_one_stops_catch_up(config: dict[str, Any]) -> None:
    """Catch-up finds indexed records by chain position: an entry seen again (a replay after a
    crash) is skipped; another record at a taken position (a fork, only possible by writing
    the journal by hand) is refused with a clear error and nothing of its batch is indexed."""
    with ProvenanceLogger(config) as lg:
        store = lg.services.provenance
        ident = lg.services.identity
        first = lg.log_inference("m", {"i": 0})
        second = lg.log_inference("m", {"i": 1})
        store.catch_up()
        journal = store._journal
        replayed = lg.services.local_blocks.get(second)
        journal.append(replayed, journal.size())
        assert store.catch_up() == 0
        with _index_db(lg) as db:
            assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 2

        cid, forked = build_record(prepare("inference", {"model": "m", "data": {"i": 99}}),
                                   node=ident.peer_id, seq=1, ts=lg.get_record(second)["ts"],
                                   prev=first, sign=ident.sign)
        journal.append(forked, journal.size())
        with pytest.raises(ProvenanceError, match=f"fork: .* seq 1 is both {second} and {cid}"):
            store.catch_up()
        with _index_db(lg) as db:
            assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 2


def test_fast_signer_matches_openssl_and_verifies() -> None:
    """Records are signed with libsodium (speed); Ed25519 is deterministic, so its signatures
    must be byte-identical to OpenSSL's and verify against the peer id."""
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for _ in range(20):
        identity = Identity(os.urandom(32))
        message = os.urandom(int.from_bytes(os.urandom(2), "big") % 2000)
        fast = identity.signer().sign(message)
        assert fast == Ed25519PrivateKey.from_private_bytes(identity.seed).sign(message)
        assert identity.sign(message) == fast
        assert verify_signature(identity.peer_id, message, fast)
        assert not verify_signature(identity.peer_id, message + b"x", fast)
