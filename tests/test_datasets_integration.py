"""The seed document's examples, run as written (real files, real CIDs instead of "Qm...").

This module runs twice in ``scripts/test``: normally (the IPFS side is the real Kubo-compatible
test daemon) and with ``IPFS_DATASETS_ENABLED=0`` (nothing may reach Kubo, everything still
works locally). Each test asserts what the seed promises in the mode it runs in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipfs_accelerate_py.datasets_integration import (
    DatasetsManager,
    FilesystemHandler,
    ProvenanceLogger,
    WorkflowCoordinator,
    get_datasets_status,
    is_datasets_available,
)
from node.config import datasets_enabled_mode

DISABLED = datasets_enabled_mode() == "off"


@pytest.fixture
def config(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A private cache_dir; with the IPFS side enabled, the real test daemon as ``ipfs_api``."""
    cfg: dict[str, Any] = {"cache_dir": str(tmp_path / "cache")}
    if not DISABLED:
        kubo = request.getfixturevalue("kubo")
        cfg["ipfs_api"] = kubo.api
        os.environ["IPFS_API"] = kubo.api  # for the module-level status functions
    yield cfg
    os.environ.pop("IPFS_API", None)


def test_status_functions(config: dict[str, Any]) -> None:
    status = get_datasets_status()
    assert {"available", "enabled", "mode", "path"} <= status.keys()
    assert status["path"].endswith(os.path.join("external", "ipfs_datasets_py"))
    if DISABLED:
        assert is_datasets_available() is False
        assert status["available"] is False and status["enabled"] is False
        assert status["mode"] == "off"
        assert "IPFS_DATASETS_ENABLED" in status["reason"]
    else:
        assert is_datasets_available() is True
        assert status["available"] is True and status["enabled"] is True
        assert status.get("reason") in (None, "")


def test_datasets_manager(config: dict[str, Any]) -> None:
    with FilesystemHandler(config) as fs, DatasetsManager(
        {**config, "enable_audit": True, "enable_provenance": True, "enable_p2p": False}
    ) as manager:
        in_cid = fs.add_file(_write(Path(config["cache_dir"]).parent / "in.txt", b"Hello world"))
        out_cid = fs.add_file(_write(Path(config["cache_dir"]).parent / "out.bin", b"\x01" * 99))

        logged = manager.log_event("model_loaded", {"model": "bert-base", "size_mb": 420})
        assert logged is (not DISABLED)  # True: reached IPFS; False: kept locally

        cid = manager.track_provenance(
            "inference", {"model": "bert-base", "input_cid": in_cid, "output_cid": out_cid}
        )
        assert isinstance(cid, str) and cid.startswith("bagu")

        status = manager.get_status()
        assert status["enabled"] is (not DISABLED)
        assert status["services"]["provenance"] is True  # local records are kept either way

        with ProvenanceLogger(config) as logger:
            upstream = logger.get_lineage(out_cid, direction="upstream")
            assert in_cid in str(upstream)
            events = logger.query_logs({"type": "event"})
            assert any(r.get("event_type") == "model_loaded" or
                       r.get("data", {}).get("model") == "bert-base" for r in events)


def test_filesystem_handler(config: dict[str, Any], tmp_path: Path) -> None:
    model = Path(_write(tmp_path / "models" / "model.bin", os.urandom(300_000)))
    dataset = tmp_path / "dataset"
    _write(dataset / "train.jsonl", b'{"text": "a"}\n')
    _write(dataset / "sub" / "test.jsonl", b'{"text": "b"}\n')

    fs = FilesystemHandler(config)
    cid = fs.add_file(str(model), pin=True)
    assert cid.startswith("Qm")
    assert cid.in_kubo is (not DISABLED)

    out = tmp_path / "output.bin"
    fs.get_file(cid, str(out))
    assert out.read_bytes() == model.read_bytes()

    dir_cid = fs.add_directory(str(dataset) + "/", recursive=True)
    entries = {e["name"]: e for e in fs.list_directory(dir_cid)}
    assert set(entries) == {"sub", "train.jsonl"}
    assert entries["sub"]["type"] == "directory" and entries["train.jsonl"]["type"] == "file"
    for entry in entries.values():
        assert entry["cid"].startswith("Qm")
    synced = fs.sync()
    if DISABLED:
        assert "records" not in synced  # never talks to Kubo
    else:
        assert synced["remaining"] == 0 and synced["records"]["remaining"] == 0
    fs.close()

    # The seed's keyword form.
    with FilesystemHandler(ipfs_api=config.get("ipfs_api", "/ip4/127.0.0.1/tcp/1"),
                           cache_dir=config["cache_dir"]) as fs2:
        assert fs2.cat(cid) == model.read_bytes()


def test_provenance_logger(config: dict[str, Any], tmp_path: Path) -> None:
    with FilesystemHandler(config) as fs:
        in_cid = fs.add_file(_write(tmp_path / "in.txt", b"tokens in"))
        out_cid = fs.add_file(_write(tmp_path / "out.txt", b"tokens out"))
    logger = ProvenanceLogger(config)
    embedding = [i / 768 for i in range(768)]
    inf = logger.log_inference(
        "bert-base",
        {"input": "Hello world", "output_embedding": embedding, "duration_ms": 150,
         "hardware": "CUDA"},
    )
    tr = logger.log_transformation(
        "tokenization", {"tokenizer": "bert-tokenizer", "max_length": 512},
        input_cid=in_cid, output_cid=out_cid,
    )
    we = logger.log_worker_execution("worker-001", "task-123",
                                     {"status": "completed", "duration_ms": 5000})
    pr = logger.log_pr_activity(
        123, "copilot_suggestion",
        {"file": "model.py", "suggestion": "Add error handling", "accepted": True},
    )
    for cid in (inf, tr, we, pr):
        assert isinstance(cid, str) and cid.startswith("bagu")

    logs = logger.query_logs({"type": "inference", "model": "bert-base"})
    assert [r["cid"] for r in logs] == [inf]
    # The 768-float embedding is split into its own block and linked; resolve=True loads it.
    assert logs[0]["data"]["output_embedding"] != embedding
    resolved = logger.query_logs({"type": "inference", "model": "bert-base"}, resolve=True)
    assert resolved[0]["data"]["output_embedding"] == embedding
    activity = logger.query_logs({"type": "pr_activity", "pr_number": 123})
    assert [r["cid"] for r in activity] == [pr]
    assert logger.verify()["ok"] is True
    logger.close()


def test_workflow_coordinator(config: dict[str, Any]) -> None:
    # The seed enables P2P for this example; a loopback listen address keeps the test local.
    coordinator = WorkflowCoordinator(
        {**config, "enable_p2p": True, "explicit_simulation": True,
         "listen_addrs": ["/ip4/127.0.0.1/tcp/0"]}
    )
    try:
        coordinator.submit_task(
            task_id="infer-001",
            task_type="inference",
            data={"model": "bert", "batch_size": 32},
            priority=8,
            tags=["P2P_ELIGIBLE", "GPU_PREFERRED"],
        )
        task = coordinator.get_next_task(worker_id="worker-001", capabilities=["GPU", "CUDA"])
        assert task is not None and task["task_id"] == "infer-001"
        assert task["data"] == {"model": "bert", "batch_size": 32}

        assert coordinator.complete_task(
            "infer-001", {"status": "success", "duration_ms": 5000}
        )
        status = coordinator.get_task_status("infer-001")
        assert status["status"] == "completed"
        assert status["worker_id"] == "worker-001"
        assert status["result"] == {"status": "success", "duration_ms": 5000}
    finally:
        coordinator.close()


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)
