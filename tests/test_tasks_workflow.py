"""WorkflowCoordinator (local mode): the seed document's calls, leases, errors, provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipfs_accelerate_py.datasets_integration import (
    ConflictError,
    InvalidArgumentError,
    LeaseError,
    NotFoundError,
    ProvenanceLogger,
    WorkflowCoordinator,
)
from node.errors import LeaseExpiredError, TaskStateError

# No Kubo on this port: provenance records stay local and the calls do not wait on a daemon.
NO_KUBO = "/ip4/127.0.0.1/tcp/9"


def _config(cache_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"cache_dir": str(cache_dir), "enable_p2p": False, "ipfs_api": NO_KUBO, **extra}


def test_seed_document_calls(cache_dir: Path) -> None:
    coordinator = WorkflowCoordinator(_config(cache_dir, explicit_simulation=True))
    coordinator.submit_task(
        task_id="infer-001",
        task_type="inference",
        data={"model": "bert", "batch_size": 32},
        priority=8,
        tags=["P2P_ELIGIBLE", "GPU_PREFERRED"],
    )
    task = coordinator.get_next_task(worker_id="worker-001", capabilities=["GPU", "CUDA"])
    assert task is not None
    assert task["task_id"] == "infer-001" and task["task_type"] == "inference"
    assert task["data"] == {"model": "bert", "batch_size": 32}
    assert task["priority"] == 8 and task["attempt"] == 1
    assert task["lease_id"] and task["lease_expires_at"] > 0
    done = coordinator.complete_task(
        "infer-001", {"status": "success", "output_cid": "Qm...", "duration_ms": 5000}
    )
    assert done["status"] == "completed"
    status = coordinator.get_task_status("infer-001")
    assert status["status"] == "completed"
    assert status["worker_id"] == "worker-001"
    assert status["result"] == {"status": "success", "output_cid": "Qm...", "duration_ms": 5000}
    assert status["attempt"] == 1
    assert status["submitted_at"] <= status["claimed_at"] <= status["completed_at"]
    assert coordinator.get_next_task(worker_id="worker-001", capabilities=["GPU"]) is None
    coordinator.close()


def test_submit_tasks_in_one_batch(cache_dir: Path) -> None:
    coordinator = WorkflowCoordinator(_config(cache_dir))
    statuses = coordinator.submit_tasks(
        {"task_id": f"shard-{n}", "task_type": "embed", "data": {"shard": n}} for n in range(3)
    )
    assert [s["status"] for s in statuses] == ["pending"] * 3
    with pytest.raises(ConflictError):  # all or nothing
        coordinator.submit_tasks([
            {"task_id": "shard-3", "task_type": "embed", "data": {"shard": 3}},
            {"task_id": "shard-0", "task_type": "embed", "data": {"shard": "other"}},
        ])
    with pytest.raises(NotFoundError):
        coordinator.get_task_status("shard-3")
    claimed = [coordinator.get_next_task("w", [])["task_id"] for _ in range(3)]
    assert claimed == ["shard-0", "shard-1", "shard-2"]
    coordinator.close()


def test_lease_is_remembered_by_the_claiming_object_only(cache_dir: Path) -> None:
    with WorkflowCoordinator(_config(cache_dir)) as a, WorkflowCoordinator(_config(cache_dir)) as b:
        a.submit_task("t1", "x", {"n": 1}, lease_seconds=30)
        grant = a.get_next_task("wa", [])
        assert grant is not None
        assert b.get_next_task("wb", []) is None  # one queue, one holder
        with pytest.raises(LeaseError, match="lease_id"):
            b.complete_task("t1", {"by": "b"})  # b holds no lease on it
        with pytest.raises(LeaseError):
            b.complete_task("t1", {"by": "b"}, lease_id="f" * 32)
        assert a.heartbeat("t1") > grant["lease_expires_at"] - 1
        # Any object may present the lease explicitly (e.g. another thread of the worker).
        st = b.complete_task("t1", {"by": "b"}, lease_id=grant["lease_id"])
        assert st["status"] == "completed" and st["worker_id"] == "wa"
        with pytest.raises(TaskStateError, match="already completed"):
            a.complete_task("t1", {"by": "a"}, lease_id="0" * 32)


def test_fail_cancel_list_and_status(cache_dir: Path) -> None:
    with WorkflowCoordinator(_config(cache_dir)) as c:
        c.submit_task("flaky", "x", {}, max_attempts=2)
        c.submit_task("doomed", "x", {}, priority=9)
        c.submit_task("unwanted", "x", {}, priority=0)
        g = c.get_next_task("w", [])
        assert g["task_id"] == "doomed"
        st = c.fail_task("doomed", "input is corrupt", retryable=False)
        assert st["status"] == "failed" and st["error"] == "input is corrupt"
        g = c.get_next_task("w", [])
        assert g["task_id"] == "flaky"
        st = c.fail_task("flaky", ValueError("transient"))
        assert st["status"] == "pending" and st["attempt"] == 2 and st["error"] == "transient"
        assert c.cancel_task("unwanted")["status"] == "cancelled"
        assert [t["task_id"] for t in c.list_tasks()] == ["unwanted", "doomed", "flaky"]
        assert [t["task_id"] for t in c.list_tasks(status="failed")] == ["doomed"]
        assert [t["task_id"] for t in c.list_tasks("pending", limit=5)] == ["flaky"]
        counts = c.get_status()["tasks"]
        assert counts == {"pending": 1, "claimed": 0, "completed": 0, "failed": 1,
                          "cancelled": 1}


def test_errors_are_clear(cache_dir: Path) -> None:
    with WorkflowCoordinator(_config(cache_dir)) as c:
        for call in (
            lambda: c.get_task_status("missing"),
            lambda: c.complete_task("missing", {}),
            lambda: c.fail_task("missing", "x"),
            lambda: c.heartbeat("missing"),
            lambda: c.cancel_task("missing"),
        ):
            with pytest.raises(NotFoundError, match="missing"):
                call()
        with pytest.raises(InvalidArgumentError, match="priority"):
            c.submit_task("t", "x", {}, priority=11)
        with pytest.raises(InvalidArgumentError, match="JSON"):
            c.submit_task("t", "x", {"blob": b"\x00"})
        with pytest.raises(InvalidArgumentError, match="task_id"):
            c.submit_task("", "x", {})
        c.submit_task("t", "x", {"a": 1})
        c.submit_task("t", "x", {"a": 1})
        with pytest.raises(ConflictError):
            c.submit_task("t", "x", {"a": 2})


def test_late_complete_through_the_facade_is_refused(cache_dir: Path) -> None:
    """Real time: a 1 s lease runs out, another worker takes over, the first is fenced."""
    import time

    with WorkflowCoordinator(_config(cache_dir)) as slow, \
            WorkflowCoordinator(_config(cache_dir)) as fast:
        slow.submit_task("t", "x", {}, lease_seconds=1)
        assert slow.get_next_task("slow", [])["task_id"] == "t"
        deadline = time.monotonic() + 30
        grant = None
        while grant is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
            grant = fast.get_next_task("fast", [])
        assert grant["attempt"] == 2
        assert slow.get_status()["leases_held"] == 1
        with pytest.raises(LeaseExpiredError):
            slow.complete_task("t", {"by": "slow"})
        assert slow.get_status()["leases_held"] == 0  # a lease that is gone is forgotten
        assert fast.complete_task("t", {"by": "fast"})["result"] == {"by": "fast"}
        assert slow.get_task_status("t")["worker_id"] == "fast"


def test_completion_writes_a_worker_execution_record(cache_dir: Path) -> None:
    with WorkflowCoordinator(_config(cache_dir)) as c, ProvenanceLogger(_config(cache_dir)) as p:
        # Real content in the node's block store: the task's input and its output.
        input_cid = c.services.local_blocks.put(b"input batch")
        output_cid = c.services.local_blocks.put(b"768 float32 embeddings")
        c.submit_task("emb-1", "embedding", {"model": "bert", "input_cid": input_cid})
        lease = c.get_next_task("gpu-worker-7", ["GPU"])["lease_id"]
        st = c.complete_task("emb-1", {"dims": 768}, result_cid=output_cid)
        record_cid = st["provenance_cid"]
        assert record_cid
        # The same completion again (a retried call): accepted, and still one record.
        again = c.complete_task("emb-1", {"dims": 768}, lease_id=lease, result_cid=output_cid)
        assert again["status"] == "completed" and again["provenance_cid"] == record_cid
        logs = p.query_logs({"type": "worker_execution", "task_id": "emb-1"})
        assert [r["cid"] for r in logs] == [record_cid]
        record = logs[0]
        assert record["worker_id"] == "gpu-worker-7"
        assert record["data"]["status"] == "completed"
        assert record["data"]["result"] == {"dims": 768}
        assert record["data"]["duration_ms"] >= 0
        # The record links the task's input to its result: lineage finds it from either side.
        upstream = p.get_lineage(output_cid, direction="upstream")
        assert [(r["cid"], r["depth"]) for r in upstream] == [(record_cid, 1)]
        downstream = p.get_lineage(input_cid, direction="downstream")
        assert [r["cid"] for r in downstream] == [record_cid]
        p.verify(record_cid)  # raises VerificationError if the signed record does not hold

        c.submit_task("bad-1", "embedding", {"model": "bert"})
        c.get_next_task("cpu-worker-2", [])
        st = c.fail_task("bad-1", "tokenizer crashed", retryable=False)
        failed = p.query_logs({"type": "worker_execution", "task_id": "bad-1"})
        assert [r["cid"] for r in failed] == [st["provenance_cid"]]
        assert failed[0]["data"]["status"] == "failed"
        assert failed[0]["data"]["error"] == "tokenizer crashed"
        assert failed[0]["worker_id"] == "cpu-worker-2"


def test_no_provenance_record_when_disabled(cache_dir: Path) -> None:
    cfg = _config(cache_dir, enable_provenance=False)
    with WorkflowCoordinator(cfg) as c:
        c.submit_task("t", "x", {})
        c.get_next_task("w", [])
        assert c.complete_task("t", {"ok": True})["provenance_cid"] is None
    with ProvenanceLogger(_config(cache_dir)) as p:
        assert p.query_logs({"type": "worker_execution"}) == []

