"""The local block store: verified reads, atomic writes, dedup, pins/gc, pending queue, and
several threads and processes writing into one store at once."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from node.errors import BlockNotFoundError, CorruptBlockError, InvalidCIDError
from node.storage import CHUNK_SIZE, INLINE_MAX, BlockService, LocalBlockStore, parse_cid


@pytest.fixture
def store(cache_dir: Path):
    s = LocalBlockStore(cache_dir / "blocks")
    yield s
    s.close()


def test_put_get_has_delete_iter(store: LocalBlockStore) -> None:
    small = b'{"type":"inference"}'
    big = random.Random(1).randbytes(INLINE_MAX + 1)
    c_small = store.put(small, codec="dag-json")
    c_big = store.put(big)
    assert c_small.startswith("baguqeera") and c_big.startswith("bafkrei")
    assert store.get(c_small) == small and store.get(c_big) == big
    assert store.has(c_small) and store.has(c_big)
    assert set(store.iter_cids()) == {c_small, c_big}
    assert list(store.iter_cids("dag-json")) == [c_small]
    assert store.put(big) == c_big and store.count() == 2  # stored once
    assert store.delete(c_big) and not store.has(c_big)
    with pytest.raises(BlockNotFoundError, match=c_big):
        store.get(c_big)
    assert not store.block_path(parse_cid(c_big).digest).exists()


def test_v0_and_v1_name_the_same_block(store: LocalBlockStore) -> None:
    node = bytes.fromhex("0a0408021800")  # the empty UnixFS file
    v1 = store.put(node, codec="dag-pb")
    assert store.get("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH") == node
    v0 = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    assert parse_cid(v1).digest == parse_cid(v0).digest


def test_put_block_verifies_and_bad_input(store: LocalBlockStore) -> None:
    cid = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    store.put_block(cid, b"hello world\n")
    assert store.get(cid) == b"hello world\n"
    with pytest.raises(CorruptBlockError, match="bafkreihdwdcefgh4"):
        store.put_block("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", b"x")
    with pytest.raises(InvalidCIDError):
        store.get("Qm...")
    with pytest.raises(InvalidCIDError):
        store.put(b"x", codec="dag-cbor")


def test_corrupt_inline_block_is_never_returned(store: LocalBlockStore) -> None:
    cid = store.put(b'{"a":1}', codec="dag-json")
    con = sqlite3.connect(store.root / "index.sqlite")
    with con:
        con.execute("UPDATE blocks SET data=? WHERE digest=?", (b'{"a":2}', parse_cid(cid).digest))
    con.close()
    with pytest.raises(CorruptBlockError) as err:
        store.get(cid)
    assert cid in str(err.value) and err.value.cid == cid


def test_corrupt_file_block_fails_get_file(cache_dir: Path, tmp_path: Path) -> None:
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store) as svc:
        data = random.Random(5).randbytes(3 * CHUNK_SIZE)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        root = svc.add_file(src, cid_version=1)
        leaf = next(c for c in store.iter_cids("raw"))
        path = store.block_path(parse_cid(leaf).digest)
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(100)
            f.write(b"\xff\x00\xff")
        with pytest.raises(CorruptBlockError, match=leaf):
            store.get(leaf)
        dest = tmp_path / "out" / "restored.bin"
        with pytest.raises(CorruptBlockError, match=leaf):
            svc.get_file(root, dest)
        assert not dest.exists()
        assert not [p for p in dest.parent.iterdir()]  # no partial file left behind
        # truncated block file: same error, naming the CID
        os.truncate(path, 10)
        with pytest.raises(CorruptBlockError, match=leaf):
            svc.cat(root)
    store.close()


def test_corrupt_dag_pb_leaf_fails_get_file(cache_dir: Path, tmp_path: Path) -> None:
    """CIDv0 leaves are sliced out of their frame without decoding; a changed byte still
    fails the hash check, names the leaf and leaves nothing at dest."""
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store) as svc:
        data = random.Random(6).randbytes(5 * CHUNK_SIZE + 1234)
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        root = svc.add_file(src)
        out = tmp_path / "ok.bin"
        svc.get_file(root, out)
        assert out.read_bytes() == data
        leaf = parse_cid(next(c for c in store.iter_cids("dag-pb") if store.size(c) > INLINE_MAX))
        path = store.block_path(leaf.digest)
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.seek(5000)
            f.write(b"\x00\x01\x02")
        dest = tmp_path / "out" / "restored.bin"
        with pytest.raises(CorruptBlockError) as err:
            svc.get_file(root, dest)
        # the error names the leaf as the DAG links it (CIDv0 "Qm...")
        assert err.value.cid.startswith("Qm") and err.value.cid in str(err.value)
        assert parse_cid(err.value.cid).digest == leaf.digest
        assert not dest.exists() and not list(dest.parent.iterdir())
        os.unlink(path)  # a missing file is named too
        with pytest.raises(CorruptBlockError) as err:
            svc.get_file(root, dest)
        assert parse_cid(err.value.cid).digest == leaf.digest
        assert not list(dest.parent.iterdir())
    store.close()


def test_get_file_reads_blocks_larger_than_a_chunk(cache_dir: Path, tmp_path: Path) -> None:
    """Blocks from other importers may exceed 256 KiB: the read buffer grows for them."""
    from node.storage import _dagpb

    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store) as svc:
        rnd = random.Random(8)
        parts = [rnd.randbytes(n) for n in (3 * CHUNK_SIZE + 7, 1000, 2 * CHUNK_SIZE)]
        kids = [parse_cid(store.put(p)) for p in parts]
        sizes = [len(p) for p in parts]
        node = _dagpb.encode_node(
            [_dagpb.PBLink(k.binary(), "", n) for k, n in zip(kids, sizes, strict=True)],
            _dagpb.encode_unixfs(
                _dagpb.UnixFSData(_dagpb.FILE, filesize=sum(sizes), blocksizes=sizes)
            ),
        )
        root = store.put(node, codec="dag-pb")
        dest = tmp_path / "big.bin"
        svc.get_file(root, dest)
        assert dest.read_bytes() == b"".join(parts)
    store.close()


def test_dedup_second_version_adds_only_new_chunks(cache_dir: Path, tmp_path: Path) -> None:
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store) as svc:
        rnd = random.Random(3)
        v1 = rnd.randbytes(8 * CHUNK_SIZE)
        v2 = v1[: 6 * CHUNK_SIZE] + rnd.randbytes(2 * CHUNK_SIZE)  # last two chunks changed
        (tmp_path / "m1.bin").write_bytes(v1)
        (tmp_path / "m2.bin").write_bytes(v2)
        svc.add_file(tmp_path / "m1.bin")
        before = store.count()
        assert before == 8 + 1  # 8 leaves + root
        cid2 = svc.add_file(tmp_path / "m2.bin")
        assert store.count() - before == 2 + 1  # 2 new leaves + new root
        assert svc.cat(cid2) == v2
        # the same content again adds nothing
        svc.add_file(tmp_path / "m2.bin")
        assert store.count() == before + 3
    store.close()


def test_pins_and_gc(cache_dir: Path, tmp_path: Path) -> None:
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store) as svc:
        rnd = random.Random(11)
        (tmp_path / "keep.bin").write_bytes(rnd.randbytes(3 * CHUNK_SIZE))
        (tmp_path / "drop.bin").write_bytes(rnd.randbytes(2 * CHUNK_SIZE))
        keep = svc.add_file(tmp_path / "keep.bin", pin=True)
        drop = svc.add_file(tmp_path / "drop.bin", pin=False)
        linked = store.put(b"an embedding kept by a record")
        record = store.put(json.dumps({"value": {"/": linked}}).encode(), codec="dag-json")
        assert {p["cid"] for p in svc.pins()} == {keep}
        result = svc.gc()
        assert result["removed"] == 2 + 1  # drop's leaves and root
        assert svc.cat(keep) == (tmp_path / "keep.bin").read_bytes()
        assert store.get(record) and store.get(linked)  # records and their links stay
        with pytest.raises(BlockNotFoundError):
            svc.cat(drop)
        assert svc.unpin(keep)
        assert svc.gc()["removed"] == 3 + 1
        with pytest.raises(BlockNotFoundError):
            svc.cat(keep)
    store.close()


def test_pin_requires_whole_dag(store: LocalBlockStore) -> None:
    with BlockService(store) as svc:
        root = svc.add_bytes(random.Random(2).randbytes(2 * CHUNK_SIZE), pin=False)
        leaf = next(c for c in store.iter_cids("dag-pb") if parse_cid(c).digest !=
                    parse_cid(root).digest)
        store.delete(leaf)
        with pytest.raises(BlockNotFoundError):
            svc.pin(root)
        assert not store.is_pinned(root)


def test_pending_queue_survives_reopen(cache_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"queued while Kubo is away")
    dead_api = "/ip4/127.0.0.1/tcp/1"  # nothing listens on port 1
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store, dead_api, timeout=2) as svc:
        cid = svc.add_file(tmp_path / "f")
        assert not cid.in_kubo
        rec, in_kubo = svc.put_block(b'{"r":1}', "dag-json")
        assert not in_kubo
        result = svc.sync()
        assert result["remaining"] == 2 and not result["kubo_available"]
    store.close()
    again = LocalBlockStore(cache_dir / "blocks")
    assert {str(c) for c, _ in again.pending()} == {cid, rec}
    assert again.get(rec) == b'{"r":1}'
    again.close()


def test_many_threads_share_one_store(store: LocalBlockStore) -> None:
    errors: list[BaseException] = []
    cids: list[str] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            for i in range(300):
                c = store.put(json.dumps({"w": n % 4, "i": i}).encode(), codec="dag-json")
                with lock:
                    cids.append(c)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(cids)) == 4 * 300  # writers 0/4, 1/5 ... wrote identical records
    assert set(store.iter_cids("dag-json")) == set(cids)
    many = store.put_many([(f'{{"batch":{i}}}'.encode(), "dag-json") for i in range(500)])
    assert all(store.has(c) for c in many)


def _add_same(cache: str, src: str, folder: str, barrier, out) -> None:  # child process
    store = LocalBlockStore(Path(cache) / "blocks")
    with BlockService(store) as svc:
        barrier.wait()
        results = []
        for _ in range(3):
            results.append(str(svc.add_file(src)))
            results.append(str(svc.add_directory(folder, cid_version=1)))
        out.put(results)
    store.close()


@pytest.mark.slow
def test_two_processes_add_same_content(cache_dir: Path, tmp_path: Path) -> None:
    rnd = random.Random(8)
    src = tmp_path / "model.bin"
    src.write_bytes(rnd.randbytes(12 * CHUNK_SIZE + 5))
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    for i in range(20):
        (folder / ("sub" if i % 2 else ".") / f"f{i}").write_bytes(rnd.randbytes(i * 20000))
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_add_same, args=(str(cache_dir), str(src), str(folder),
                                                  barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert results[0] == results[1] and len(set(results[0])) == 2
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store) as svc:
        assert svc.cat(results[0][0]) == src.read_bytes()
        for c in store.iter_cids():  # every block verifies
            store.get(c)
        svc.get_file(results[0][1], tmp_path / "restored")
        assert (tmp_path / "restored" / "sub" / "f19").read_bytes() == (
            folder / "sub" / "f19").read_bytes()
    leftovers = [p for p in (cache_dir / "blocks").rglob("*.tmp")]
    assert leftovers == []
    store.close()


def test_gc_never_takes_blocks_of_an_add_in_progress(cache_dir: Path, tmp_path: Path) -> None:
    store = LocalBlockStore(cache_dir / "blocks")
    data = random.Random(4).randbytes(20 * CHUNK_SIZE)
    (tmp_path / "big").write_bytes(data)
    stop = threading.Event()
    removed: list[int] = []

    def collector() -> None:
        while not stop.is_set():
            removed.append(store.gc()["removed"])

    with BlockService(store) as svc:
        t = threading.Thread(target=collector)
        t.start()
        try:
            cids = [svc.add_file(tmp_path / "big", cid_version=v % 2) for v in range(4)]
        finally:
            stop.set()
            t.join()
        for c in cids:
            assert hashlib.sha256(svc.cat(c)).digest() == hashlib.sha256(data).digest()
    assert removed  # gc really ran meanwhile
    store.close()
