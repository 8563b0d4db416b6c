"""Fallback behaviour: no IPFS daemon answers and P2P is off, and nothing is dropped.

The original integration returned False and threw the data away when IPFS was absent; dsi
returns the seed's "fell back" values but keeps everything locally, readable and queryable,
and pushes it to Kubo once one answers (``sync``).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from ipfs_accelerate_py.datasets_integration import (
    DatasetsManager,
    FilesystemHandler,
    InvalidCIDError,
    NotFoundError,
    ProvenanceLogger,
    WorkflowCoordinator,
    get_datasets_status,
)
from node.config import datasets_enabled_mode


def _closed_port_api() -> str:
    """A loopback API address where nothing listens (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}"


@pytest.fixture
def config(tmp_path: Path) -> dict[str, Any]:
    return {"cache_dir": str(tmp_path / "cache"), "ipfs_api": _closed_port_api()}


def test_status_says_why_unavailable(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IPFS_API", config["ipfs_api"])
    status = get_datasets_status()
    assert status["available"] is False
    assert status["reason"]  # a human-readable cause, not an empty string


def test_files_are_kept_locally_and_readable(config: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights" * 100_000)
    with FilesystemHandler(config) as fs:
        cid = fs.add_file(str(src))
        assert cid.in_kubo is False
        assert fs.cat(cid) == src.read_bytes()
        assert cid in {p["cid"] for p in fs.list_pins()}
    # A new handler (same cache_dir) still has it: nothing lived only in memory.
    with FilesystemHandler(config) as fs:
        fs.get_file(cid, str(tmp_path / "back.bin"))
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_events_and_provenance_are_kept(config: dict[str, Any]) -> None:
    with DatasetsManager(config) as manager:
        assert manager.log_event("inference", {"model": "bert"}) is False  # kept locally
        cid = manager.track_provenance("upload", {"model": "bert", "version": "1.0"})
        assert isinstance(cid, str)
    with ProvenanceLogger(config) as logger:
        assert logger.query_logs({"model": "bert"}, limit=10)
        assert logger.get_record(cid)["type"] == "provenance"
        assert logger.verify()["ok"] is True


def test_tasks_work_without_p2p(config: dict[str, Any]) -> None:
    with WorkflowCoordinator(config) as coordinator:
        coordinator.submit_task("t-1", "inference", {"x": 1}, priority=7)
        task = coordinator.get_next_task("w", ["CPU"])
        assert task is not None and task["task_id"] == "t-1"
        coordinator.complete_task("t-1", {"ok": True})
        assert coordinator.get_task_status("t-1")["status"] == "completed"
        assert coordinator.services.p2p_running is False


def test_bad_arguments_raise_instead_of_returning_false(config: dict[str, Any]) -> None:
    with FilesystemHandler(config) as fs, WorkflowCoordinator(config) as coordinator:
        with pytest.raises(InvalidCIDError):
            fs.cat("Qm...")
        with pytest.raises(NotFoundError):
            coordinator.get_task_status("no-such-task")
        with pytest.raises(FileNotFoundError):
            fs.add_file(str(Path(config["cache_dir"]) / "missing.bin"))


def test_disabled_mode_is_reported(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("IPFS_DATASETS_ENABLED", "off")
    assert datasets_enabled_mode() == "off"
    assert get_datasets_status()["enabled"] is False
    monkeypatch.setenv("IPFS_DATASETS_ENABLED", "maybe")
    with pytest.raises(ValueError, match="IPFS_DATASETS_ENABLED"):
        get_datasets_status()
