"""Against the real Kubo-compatible daemon: same CIDs locally and in the daemon, add/cat/get/ls/
pin through both sides, fetching from Kubo with verification, and the daemon dying mid-run."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from node.errors import BlockNotFoundError, InvalidCIDError
from node.storage import CHUNK_SIZE, BlockService, KuboClient, LocalBlockStore

pytestmark = pytest.mark.kubo


@pytest.fixture
def client(kubo):
    with KuboClient(kubo.api, timeout=30) as c:
        yield c


@pytest.fixture
def svc(kubo, cache_dir: Path):
    store = LocalBlockStore(cache_dir / "blocks")
    with BlockService(store, kubo.api, timeout=3) as s:
        yield s
    store.close()


def make_folder(root: Path, seed: int) -> Path:
    rnd = random.Random(seed)
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "ünï").mkdir()
    (root / "a.txt").write_bytes(b"hello world\n")
    (root / "sub" / "big.bin").write_bytes(rnd.randbytes(2 * CHUNK_SIZE + 11))
    (root / "ünï" / "日本.txt").write_bytes(rnd.randbytes(999))
    (root / ".hidden").write_bytes(b"")
    return root


@pytest.mark.parametrize("cid_version", [0, 1])
def test_same_cids_locally_and_in_daemon(svc: BlockService, client: KuboClient, tmp_path: Path,
                                         cid_version: int) -> None:
    rnd = random.Random(cid_version)
    for size in [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, rnd.randrange(3 * CHUNK_SIZE)]:
        path = tmp_path / f"f{size}"
        path.write_bytes(rnd.randbytes(size))
        theirs = client.add_file(path, cid_version=cid_version, pin=False)
        ours = svc.add_file(path, cid_version=cid_version)
        assert ours == theirs, size
    folder = make_folder(tmp_path / "dataset", 5)
    assert svc.add_directory(folder, cid_version=cid_version) == client.add_directory(
        folder, cid_version=cid_version, only_hash=True
    )


def test_local_adds_reach_the_daemon(svc: BlockService, client: KuboClient,
                                     tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 * CHUNK_SIZE + 7)
    (tmp_path / "model.bin").write_bytes(data)
    cid = svc.add_file(tmp_path / "model.bin", pin=True)
    assert cid.in_kubo
    assert client.cat(cid) == data
    assert cid in client.pin_ls()
    folder = make_folder(tmp_path / "ds", 9)
    dir_cid = svc.add_directory(folder, cid_version=1)
    assert dir_cid.in_kubo
    names = sorted(e["Name"] for e in client.ls(dir_cid))
    assert names == sorted(e["name"] for e in svc.ls(dir_cid)) == [".hidden", "a.txt", "sub",
                                                                   "ünï"]
    out = client.get(dir_cid, tmp_path / "via-kubo-get")
    assert (out / "sub" / "big.bin").read_bytes() == (folder / "sub" / "big.bin").read_bytes()
    assert (out / "ünï" / "日本.txt").read_bytes() == (folder / "ünï" / "日本.txt").read_bytes()
    record, in_kubo = svc.put_block(b'{"type":"inference"}', "dag-json")
    assert in_kubo and client.block_get(record) == b'{"type":"inference"}'
    assert svc.unpin(cid) and cid not in client.pin_ls()


def test_get_file_fetches_from_kubo_and_verifies(svc: BlockService, client: KuboClient,
                                                 tmp_path: Path) -> None:
    data = random.Random(2).randbytes(5 * CHUNK_SIZE + 3)
    (tmp_path / "remote.bin").write_bytes(data)
    cid = client.add_file(tmp_path / "remote.bin", cid_version=1)  # only the daemon has it
    assert not svc.has(cid)
    out = Path(svc.get_file(cid, tmp_path / "fetched.bin"))
    assert out.read_bytes() == data
    assert svc.has(cid)  # cached locally, block by block, after verification
    folder = make_folder(tmp_path / "remote-ds", 3)
    dir_cid = client.add_directory(folder)
    listing = svc.ls(dir_cid)
    assert {e["name"]: e["type"] for e in listing}["sub"] == "directory"
    svc.get_file(dir_cid, tmp_path / "ds-out")
    assert (tmp_path / "ds-out" / "a.txt").read_bytes() == b"hello world\n"
    assert svc.pin(dir_cid)  # everything present locally now, pinned in both


def test_missing_and_invalid_cids_with_daemon_up(svc: BlockService, tmp_path: Path) -> None:
    nobody = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    with pytest.raises(BlockNotFoundError, match=nobody):
        svc.get_file(nobody, tmp_path / "x")  # the daemon's timeout= stops its wait
    with pytest.raises(InvalidCIDError):
        svc.get_file("Qm...", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_daemon_stops_mid_run_then_sync(kubo_private, cache_dir: Path, tmp_path: Path) -> None:
    """Kubo dies in the middle: adds keep working locally, nothing is lost, sync() pushes."""
    store = LocalBlockStore(cache_dir / "blocks")
    svc = BlockService(store, kubo_private.api, timeout=3)
    rnd = random.Random(4)
    files = []
    for i in range(4):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(rnd.randbytes(rnd.randrange(1, 12 * CHUNK_SIZE)))
        files.append(p)
    first = svc.add_file(files[0])
    assert first.in_kubo
    # stop the daemon while a large add is being pushed to it
    results: dict[str, object] = {}

    def big_add() -> None:
        results["cid"] = svc.add_file(files[1], cid_version=1)

    t = threading.Thread(target=big_add)
    t.start()
    kubo_private.stop()
    t.join(120)
    later = svc.add_file(files[2])
    folder = make_folder(tmp_path / "ds", 1)
    dir_cid = svc.add_directory(folder)
    record, rec_in_kubo = svc.put_block(b'{"while":"down"}', "dag-json")
    assert not later.in_kubo and not dir_cid.in_kubo and not rec_in_kubo
    for cid, src in [(first, files[0]), (results["cid"], files[1]), (later, files[2])]:
        assert svc.cat(cid) == src.read_bytes()  # nothing lost locally
    assert svc.sync()["remaining"] >= 3 and not svc.kubo_available()
    svc.close()
    store.close()

    kubo_private.start_again()
    store = LocalBlockStore(cache_dir / "blocks")  # the queue survived the "restart"
    svc = BlockService(store, kubo_private.api, timeout=5)
    result = svc.sync()
    assert result["remaining"] == 0 and result["kubo_available"]
    assert {str(later), str(dir_cid), str(record)} <= set(result["pushed"])
    with KuboClient(kubo_private.api, timeout=10) as client:
        for cid, src in [(first, files[0]), (results["cid"], files[1]), (later, files[2])]:
            assert client.cat(cid) == src.read_bytes()
        assert client.block_get(record) == b'{"while":"down"}'
        assert {str(later), str(dir_cid)} <= set(client.pin_ls())
        assert next(e["Name"] for e in client.ls(dir_cid)) == ".hidden"
    svc.close()
    store.close()


def test_reads_hamt_sharded_folders_written_by_the_daemon(svc: BlockService, client: KuboClient,
                                                          tmp_path: Path) -> None:
    """Kubo shards big folders (HAMT); listing and exporting them must work here too."""
    folder = tmp_path / "many"
    (folder / "inner").mkdir(parents=True)
    names = [f"file-{i:03d}-{'é' if i % 3 else 'x'}" for i in range(40)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(f"entry {i}\n".encode())
    (folder / "inner" / "deep.txt").write_bytes(b"deep")
    cid = client.add_directory(folder, cid_version=1, shard_split_threshold=8)
    assert svc.stat(cid)["type"] == "directory"
    listing = svc.ls(cid)
    assert sorted(e["name"] for e in listing) == sorted([*names, "inner"])
    out = Path(svc.get_file(cid, tmp_path / "out"))
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "inner"])
    assert (out / "file-007-é").read_bytes() == b"entry 7\n"
    assert (out / "inner" / "deep.txt").read_bytes() == b"deep"
    # it really was sharded: the root's UnixFS type is HAMTShard (5)
    from node.storage._dagpb import HAMT_SHARD, decode_node, decode_unixfs

    root = decode_unixfs(decode_node(svc.get_block(cid)).data or b"")
    assert root.type == HAMT_SHARD


def _daemon_add(api: str, data: bytes, **options: str) -> str:
    """``ipfs add`` with options this project's importer never uses (plain HTTP, not our client)."""
    import json

    import httpx

    port = api.rsplit("/", 1)[-1]
    if options.get("cid-version") == "1":
        options = {"cid-base": "base32", **options}  # js-ipfs refuses base32 for CIDv0
    resp = httpx.post(f"http://127.0.0.1:{port}/api/v0/add", params={"pin": "false", **options},
                      files={"file": ("data", data)}, timeout=30)
    resp.raise_for_status()
    return str(json.loads(resp.text.strip().splitlines()[-1])["Hash"])


@pytest.mark.parametrize("options", [
    {"chunker": "size-1000"},  # many small leaves: a deeper tree with 174-link nodes
    {"trickle": "true"},  # trickle layout: internal nodes at uneven depths
    {"trickle": "true", "chunker": "size-4096"},
    {"raw-leaves": "true"},  # CIDv0 root over CIDv1 raw leaves
    {"cid-version": "1", "raw-leaves": "false"},  # CIDv1 root over dag-pb leaves
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_reads_files_shaped_by_other_importer_options(svc: BlockService, kubo, tmp_path: Path,
                                                      options: dict[str, str]) -> None:
    """Content someone else added with non-default options reads back byte for byte."""
    data = random.Random(str(options)).randbytes(600_000)
    cid = _daemon_add(kubo.api, data, **options)
    assert svc.cat(cid) == data
    out = Path(svc.get_file(cid, tmp_path / "out.bin"))
    assert out.read_bytes() == data
    assert svc.stat(cid)["size"] == len(data)


def test_other_hash_functions_are_a_clear_error(svc: BlockService, kubo, tmp_path: Path) -> None:
    cid = _daemon_add(kubo.api, b"sha2-512 content", hash="sha2-512", **{"cid-version": "1"})
    with pytest.raises(InvalidCIDError, match="sha2-512"):
        svc.get_file(cid, tmp_path / "x")
    assert not (tmp_path / "x").exists()
