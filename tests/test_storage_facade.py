"""The seed document's FilesystemHandler calls and the status functions, with real files,
with and without the daemon."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ipfs_accelerate_py.datasets_integration import (
    FilesystemHandler,
    get_datasets_status,
    is_datasets_available,
)
from node import status as node_status
from node.errors import ConfigError, InvalidArgumentError, InvalidCIDError, PathNotFoundError
from node.storage import CHUNK_SIZE, KuboClient

DEAD_API = "/ip4/127.0.0.1/tcp/1"  # nothing listens there


@pytest.fixture(autouse=True)
def _fresh_status_cache():
    node_status.clear_cache()
    yield
    node_status.clear_cache()


def seed_files(root: Path) -> tuple[Path, Path]:
    rnd = random.Random(42)
    model = root / "model.bin"
    model.write_bytes(rnd.randbytes(2 * CHUNK_SIZE + 100))
    dataset = root / "dataset"
    (dataset / "train").mkdir(parents=True)
    (dataset / "train" / "part-0.jsonl").write_bytes(b'{"text": "hello"}\n' * 100)
    (dataset / "README.md").write_bytes("# données ✓\n".encode())
    return model, dataset


def run_seed_calls(fs: FilesystemHandler, tmp_path: Path) -> tuple[str, str]:
    model, dataset = seed_files(tmp_path)
    cid = fs.add_file(str(model), pin=True)
    fs.get_file(cid, str(tmp_path / "output.bin"))
    assert (tmp_path / "output.bin").read_bytes() == model.read_bytes()
    dir_cid = fs.add_directory(str(dataset) + "/", recursive=True)
    names = []
    for entry in fs.list_directory(dir_cid):
        names.append((entry["name"], entry["cid"], entry["type"]))
        assert entry["size"] >= 0
    assert [n for n, _, _ in names] == ["README.md", "train"]
    assert fs.cat(names[0][1]) == (dataset / "README.md").read_bytes()
    assert {p["cid"] for p in fs.list_pins()} >= {cid, dir_cid}
    return cid, dir_cid


def test_seed_calls_without_daemon(cache_dir: Path, tmp_path: Path) -> None:
    with FilesystemHandler({"cache_dir": str(cache_dir)}, ipfs_api=DEAD_API) as fs:
        cid, dir_cid = run_seed_calls(fs, tmp_path)
        assert cid.startswith("Qm") and not cid.in_kubo and not dir_cid.in_kubo
        assert fs.status()["backend"] == "local"
        assert fs.sync()["remaining"] == 2
        with pytest.raises(PathNotFoundError):
            fs.add_file("/path/to/model.bin")
        with pytest.raises(InvalidCIDError):
            fs.get_file("Qm...", str(tmp_path / "x"))
        with pytest.raises(InvalidArgumentError, match="dest must be a path"):
            fs.get_file(cid, None)
        assert fs.unpin(cid) and fs.gc()["removed"] == 0  # still queued for Kubo: kept
    # a second handler on the same cache_dir reads what the first stored
    with FilesystemHandler(cache_dir=str(cache_dir), ipfs_api=DEAD_API) as fs2:
        assert fs2.cat(cid) == (tmp_path / "model.bin").read_bytes()


def test_seed_calls_with_daemon(kubo, cache_dir: Path, tmp_path: Path) -> None:
    with FilesystemHandler({"cache_dir": str(cache_dir)}, ipfs_api=kubo.api) as fs:
        cid, dir_cid = run_seed_calls(fs, tmp_path)
        assert cid.in_kubo and dir_cid.in_kubo
        assert fs.status()["backend"] == "kubo+local"
        with KuboClient(kubo.api) as client:
            assert client.cat(cid) == (tmp_path / "model.bin").read_bytes()
            assert {cid, dir_cid} <= set(client.pin_ls())
        v1 = fs.add_file(str(tmp_path / "model.bin"), cid_version=1)
        assert v1.startswith("bafybei") and v1.in_kubo
        synced = fs.sync()
        records = synced.pop("records")  # provenance records are pushed by the same call
        assert synced == {"pushed": [], "failed": [], "remaining": 0, "kubo_available": True}
        assert records["remaining"] == 0


def test_switched_off_never_talks_to_kubo(kubo, cache_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFS_DATASETS_ENABLED", "0")
    with FilesystemHandler(cache_dir=str(cache_dir), ipfs_api=kubo.api) as fs:
        cid, _ = run_seed_calls(fs, tmp_path)
        assert not cid.in_kubo and fs.status()["backend"] == "local"
    status = get_datasets_status(ipfs_api=kubo.api)
    assert status["enabled"] is False and status["available"] is False
    assert status["mode"] == "off" and "IPFS_DATASETS_ENABLED" in status["reason"]


def test_status_with_daemon(kubo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFS_API", kubo.api)
    assert is_datasets_available() is True
    s = get_datasets_status()
    assert s["available"] and s["enabled"] and s["mode"] == "auto"
    assert s["ipfs_api"] == kubo.api and s["backend"] == "kubo+local"
    assert s["kubo_agent_version"].startswith("js-ipfs/")
    assert s.get("reason") is None
    assert s["path"].endswith("external/ipfs_datasets_py") and s["path_exists"] in (True, False)
    monkeypatch.setenv("IPFS_DATASETS_ENABLED", "yes")
    assert get_datasets_status()["mode"] == "on"


def test_status_without_daemon_and_bad_env(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFS_DATASETS_PATH", str(tmp_path))
    s = get_datasets_status({"ipfs_api": DEAD_API})
    assert s["available"] is False and s["enabled"] is True
    assert DEAD_API in s["reason"] and s["path"] == str(tmp_path) and s["path_exists"]
    assert s["backend"] == "local" and s["kubo_agent_version"] is None
    assert is_datasets_available(ipfs_api=DEAD_API) is False
    monkeypatch.setenv("IPFS_DATASETS_ENABLED", "maybe")
    with pytest.raises(ConfigError, match="IPFS_DATASETS_ENABLED"):
        get_datasets_status()
    with pytest.raises(ConfigError):
        is_datasets_available()


def test_status_cache_is_brief(kubo_private) -> None:
    """The probe's answer is reused for ~2 s, then a stopped daemon is noticed."""
    first = get_datasets_status(ipfs_api=kubo_private.api)
    assert first["available"]
    kubo_private.stop()
    assert get_datasets_status(ipfs_api=kubo_private.api)["available"]  # cached answer
    key = ("auto", kubo_private.api, first["path"])
    stamp, cached = node_status._cache[key]
    node_status._cache[key] = (stamp - node_status.CACHE_TTL - 0.1, cached)  # age it
    s = get_datasets_status(ipfs_api=kubo_private.api)
    assert not s["available"] and kubo_private.api in s["reason"]
