"""Kubo-identical CIDs for files and folders, checked against independent oracles.

Files: aleph-cid (Rust, computes Kubo's CIDv0 and CIDv1-raw-leaves). Folders: the js UnixFS
importer that js-ipfs itself uses (aleph-cid drops empty sub-folders). HAMT-sharded folders:
Kubo's own test vectors (its data generator re-implemented here) for the threshold, and the js
importer with sharding forced on for the shard encoding. Data is generated from fixed seeds so a
failure reproduces.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import aleph_cid
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from node.storage import CHUNK_SIZE, MAX_LINKS, BlockService, LocalBlockStore, _dagpb, _unixfs
from node.storage._cid import parse_cid

Oracle = Callable[..., str]


@pytest.fixture
def service(cache_dir: Path) -> Iterator[BlockService]:
    with BlockService(LocalBlockStore(cache_dir / "blocks")) as svc:
        yield svc
    svc.local.close()


def aleph_v0(data: bytes) -> str:
    return aleph_cid.compute_cid(data)


def aleph_v1(data: bytes) -> str:
    h = aleph_cid.CidHasher.for_ipfs_v1_raw_leaves()
    h.update(data)
    return h.finalize()


def test_known_vectors(service: BlockService) -> None:
    assert service.add_bytes(b"") == "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    assert service.add_bytes(b"", cid_version=1) == (
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    )
    assert service.add_bytes(b"hello world\n") == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert service.add_bytes(b"hello world\n", cid_version=1) == (
        "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    )


BOUNDARY_SIZES = [0, 1, 2, 1000, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE,
                  3 * CHUNK_SIZE + 17]


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_file_cids_match_aleph_at_boundaries(service: BlockService, tmp_path: Path,
                                             size: int) -> None:
    data = random.Random(size).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    v0 = service.add_file(path)
    v1 = service.add_file(path, cid_version=1)
    assert v0 == aleph_v0(data)
    assert v1 == aleph_v1(data)
    assert service.cat(v0) == data and service.cat(v1) == data


def test_file_cids_match_aleph_on_random_sizes(service: BlockService, tmp_path: Path) -> None:
    rnd = random.Random(20240601)
    for i in range(12):
        size = rnd.choice([rnd.randrange(0, 4096), rnd.randrange(0, 6 * CHUNK_SIZE)])
        data = rnd.randbytes(size)
        path = tmp_path / f"r{i}.bin"
        path.write_bytes(data)
        assert service.add_file(path) == aleph_v0(data), size
        assert service.add_file(path, cid_version=1) == aleph_v1(data), size


def test_deeper_dag_over_174_chunks(service: BlockService, tmp_path: Path,
                                    unixfs_oracle: Oracle) -> None:
    """175 chunks + 3 bytes needs a second tree level (about 46 MiB)."""
    size = (MAX_LINKS + 1) * CHUNK_SIZE + 3
    data = random.Random(175).randbytes(size)
    path = tmp_path / "deep.bin"
    path.write_bytes(data)
    v0 = service.add_file(path)
    v1 = service.add_file(path, cid_version=1)
    assert v0 == aleph_v0(data)
    assert v1 == aleph_v1(data)
    assert v0 == unixfs_oracle(path, 0)
    out = Path(service.get_file(v1, tmp_path / "out.bin"))
    assert out.read_bytes() == data
    # exactly 174 chunks still fits in one node
    exact = data[: MAX_LINKS * CHUNK_SIZE]
    assert service.add_bytes(exact) == aleph_v0(exact)


def make_tree(root: Path, rnd: random.Random, depth: int = 0) -> None:
    """A random folder: files of varied sizes, sub-folders, empty folders, odd names."""
    root.mkdir(parents=True, exist_ok=True)
    names = ["a.txt", "B.bin", "zeta", "ünïcødé.txt", "日本語", ".hidden", "space name",
             "x+y=z", "10", "9", "ça", "émoji-🙂"]
    for name in rnd.sample(names, rnd.randrange(1, 6)):
        size = rnd.choice([0, 1, rnd.randrange(2, 5000), rnd.randrange(CHUNK_SIZE - 2,
                                                                      CHUNK_SIZE * 2 + 9)])
        (root / name).write_bytes(rnd.randbytes(size))
    if depth < 3:
        for i in range(rnd.randrange(0, 3)):
            make_tree(root / f"dir{i}-{rnd.choice(['ä', 'b', 'Ω'])}", rnd, depth + 1)
    if rnd.random() < 0.5:
        (root / f"empty{depth}").mkdir()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_folder_cids_match_js_importer(service: BlockService, tmp_path: Path,
                                       unixfs_oracle: Oracle, seed: int) -> None:
    tree = tmp_path / f"dataset{seed}"
    make_tree(tree, random.Random(seed))
    (tree / "nested" / "empty-inner").mkdir(parents=True)
    assert service.add_directory(tree) == unixfs_oracle(tree, 0)
    assert service.add_directory(tree, cid_version=1) == unixfs_oracle(tree, 1)


def test_empty_folder_and_listing(service: BlockService, tmp_path: Path,
                                  unixfs_oracle: Oracle) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert service.add_directory(empty) == "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
    tree = tmp_path / "t"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "b.txt").write_bytes(b"bbb")
    (tree / "a.txt").write_bytes(b"hello world\n")
    (tree / "ü").write_bytes(b"")
    cid = service.add_directory(tree)
    assert cid == unixfs_oracle(tree, 0)
    entries = service.ls(cid)
    assert [e["name"] for e in entries] == ["a.txt", "b.txt", "sub", "ü"]  # sorted by bytes
    by_name = {e["name"]: e for e in entries}
    assert by_name["a.txt"]["cid"] == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert by_name["a.txt"]["size"] == 12 and by_name["a.txt"]["type"] == "file"
    assert by_name["sub"]["type"] == "directory"
    assert by_name["ü"]["size"] == 0


def test_non_recursive_add_skips_subfolders(service: BlockService, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x").write_bytes(b"x")
    (tree / "top").write_bytes(b"top")
    flat = tmp_path / "flat" / "t"
    flat.mkdir(parents=True)
    (flat / "top").write_bytes(b"top")
    assert service.add_directory(tree, recursive=False) == service.add_directory(flat)


def test_folder_roundtrip_through_get_file(service: BlockService, tmp_path: Path) -> None:
    tree = tmp_path / "src"
    make_tree(tree, random.Random(99))
    cid = service.add_directory(tree, cid_version=1)
    out = Path(service.get_file(cid, tmp_path / "out"))

    def snapshot(p: Path) -> dict[str, bytes | None]:
        return {
            str(f.relative_to(p)): (f.read_bytes() if f.is_file() else None)
            for f in sorted(p.rglob("*"))
        }

    assert snapshot(out) == snapshot(tree)
    # adding the exported copy gives the same CID again
    assert service.add_directory(out, cid_version=1) == cid


def test_progress_callbacks_cover_every_byte(service: BlockService, tmp_path: Path) -> None:
    data = random.Random(6).randbytes(5 * CHUNK_SIZE + 123)
    (tmp_path / "p.bin").write_bytes(data)
    seen_add: list[int] = []
    seen_get: list[int] = []
    cid = service.add_file(tmp_path / "p.bin", progress=seen_add.append)
    service.get_file(cid, tmp_path / "p.out", progress=seen_get.append)
    assert sum(seen_add) == sum(seen_get) == len(data)
    assert len(seen_add) == 6  # one call per chunk: the CLI draws its bar from these


# ------------------------------------------------------------------------------ HAMT folders
def kubo_deterministic_names(folder: Path, count: int, name_len: int, seed: str) -> None:
    """Kubo's test/cli ``createDeterministicFiles``: names drawn from a ChaCha20 stream (key
    sha256(seed), zero nonce) mapped onto its 39-character alphabet, each file holding "x"."""
    alphabet = "abcdefghijklmnopqrstuvwxyz01234567890-_"
    stream = Cipher(algorithms.ChaCha20(hashlib.sha256(seed.encode()).digest(), bytes(16)),
                    mode=None).encryptor()
    folder.mkdir(parents=True)
    for _ in range(count):
        name = "".join(alphabet[b % len(alphabet)] for b in stream.update(bytes(name_len)))
        (folder / name).write_bytes(b"x")


def test_hamt_threshold_matches_kubo_vectors(service: BlockService, tmp_path: Path) -> None:
    """Kubo's unixfs-v0-2015 (default) profile vectors, test/cli/cid_profiles_test.go: 4,096
    names of 30 bytes estimate at exactly 262,144 bytes and stay flat; 4,033 names of 31 bytes
    estimate at 262,145 and become a HAMT."""
    flat, sharded = tmp_path / "flat", tmp_path / "sharded"
    kubo_deterministic_names(flat, 4096, 30, "hamt-unixfs-v0-2015")
    kubo_deterministic_names(sharded, 4033, 31, "hamt-unixfs-v0-2015")
    flat_cid = service.add_directory(flat)
    assert flat_cid == "QmX5GtRk3TSSEHtdrykgqm4eqMEn3n2XhfkFAis5fjyZmN"
    assert service.stat(flat_cid)["type"] == "directory"
    hamt_cid = service.add_directory(sharded)
    assert hamt_cid == "QmeMiJzmhpJAUgynAcxTQYek5PPKgdv3qEvFsdV3XpVnvP"
    root = _unixfs._decode(parse_cid(hamt_cid), service.get_block(hamt_cid))[1]
    assert root.type == _dagpb.HAMT_SHARD and root.fanout == 256
    # the sharded folder lists and writes out like any other
    entries = service.ls(hamt_cid)
    assert sorted(e["name"] for e in entries) == sorted(p.name for p in sharded.iterdir())
    assert {e["size"] for e in entries} == {1}
    out = Path(service.get_file(hamt_cid, tmp_path / "out"))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in sharded.iterdir())
    assert {p.read_bytes() for p in out.iterdir()} == {b"x"}
    assert service.add_directory(out) == hamt_cid


def test_hamt_hash_is_murmur3_x64_first_half() -> None:
    # murmur3-x64-128("hello", seed 0) = cbd8a7b341bd9b02 5b1e906a48ae1d19 (h1, h2)
    assert _unixfs.hamt_hash(b"hello").hex() == "cbd8a7b341bd9b02"
    assert _unixfs.hamt_hash("日本語".encode()) == _unixfs.hamt_hash("日本語".encode())
    assert len(_unixfs.hamt_hash(b"")) == 8


@pytest.mark.parametrize("seed", [4, 5])
def test_hamt_encoding_matches_js_importer(service: BlockService, tmp_path: Path,
                                          unixfs_oracle: Oracle, seed: int) -> None:
    """Sharding forced on every non-empty folder (threshold 0 here, 1 entry in js): nested
    folders, empty folders, non-ASCII names, and one folder big enough that many slots hold
    sub-shards (and some sub-shards hold sub-shards)."""
    rnd = random.Random(seed)
    tree = tmp_path / f"tree{seed}"
    make_tree(tree, rnd)
    wide = tree / "wide"
    wide.mkdir()
    for i in range(700):
        (wide / f"{rnd.choice(['f', 'ß', '文'])}{i}-{rnd.randrange(10**6)}").write_bytes(
            rnd.randbytes(rnd.choice([0, 1, 100]))
        )
    for version in (0, 1):
        imp = _unixfs.Importer(service.local, service.pool, cid_version=version,
                               hamt_threshold=0)
        try:
            node = imp.add_directory(tree)
            imp.flush()
        finally:
            imp.wait()
        assert str(node.cid) == unixfs_oracle(tree, version, shard_at=1)
        listed = {e["name"] for e in service.ls(str(node.cid))}
        assert listed == {p.name for p in tree.iterdir()}
        out = Path(service.get_file(str(node.cid), tmp_path / f"out{seed}-{version}"))
        assert sorted(p.name for p in (out / "wide").iterdir()) == sorted(
            p.name for p in wide.iterdir()
        )


def test_hamt_threshold_counts_cidv1_bytes(service: BlockService, tmp_path: Path) -> None:
    """With ``cid_version=1`` every link's CID is 36 bytes, so 4,096 names of 28 bytes sit
    exactly at 262,144 (flat) and 29-byte names go one link's worth over (sharded)."""
    at, over = tmp_path / "at", tmp_path / "over"
    kubo_deterministic_names(at, 4096, 28, "dsi-v1-at")
    kubo_deterministic_names(over, 4096, 29, "dsi-v1-over")
    for folder, kind in ((at, _dagpb.DIRECTORY), (over, _dagpb.HAMT_SHARD)):
        cid = service.add_directory(folder, cid_version=1)
        assert cid.startswith("bafy")
        root = _unixfs._decode(parse_cid(cid), service.get_block(cid))[1]
        assert root.type == kind, folder.name
        assert len(service.ls(cid)) == 4096
