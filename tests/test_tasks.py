"""TaskQueue unit behaviour on real SQLite files, with an injected clock (no sleeping)."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node.errors import (
    AlreadyClaimedError,
    ConflictError,
    DatasetsError,
    IncapableError,
    InvalidArgumentError,
    InvalidCIDError,
    LeaseError,
    LeaseExpiredError,
    NotFoundError,
    PeerDeniedError,
    TaskStateError,
)
from node.tasks import QueueBusy, TaskQueue
from protocols.codec import MAX_JSON_DEPTH

HELLO_CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"  # "hello world\n" (Kubo)


class Clock:
    """A settable clock: lease and backoff arithmetic is tested without waiting."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "tasks.sqlite"


@pytest.fixture
def q(db: Path, clock: Clock) -> Any:
    queue = TaskQueue(db, clock=clock, backoff_base=1.0, backoff_max=300.0)
    yield queue
    queue.close()


# ---------------------------------------------------------------------------- submit
def test_submit_returns_pending_status(q: TaskQueue, clock: Clock) -> None:
    st = q.submit("t1", "inference", {"model": "bert", "batch_size": 32}, priority=8,
                  tags=["P2P_ELIGIBLE", "GPU_PREFERRED"], requires=["cuda"])
    assert st["task_id"] == "t1"
    assert st["status"] == "pending"
    assert st["attempt"] == 1 and st["max_attempts"] == 3
    assert st["priority"] == 8
    assert st["tags"] == ["GPU_PREFERRED", "P2P_ELIGIBLE"]
    assert st["requires"] == ["cuda"]
    assert st["data"] == {"model": "bert", "batch_size": 32}
    assert st["submitted_at"] == clock.t
    assert st["worker_id"] is None and st["result"] is None and st["error"] is None
    assert q.counts()["pending"] == 1


def test_submit_is_idempotent_for_the_same_body(q: TaskQueue, clock: Clock) -> None:
    first = q.submit("t1", "x", {"a": 1, "b": [1, 2]}, tags=["B", "A"], requires=["GPU", "cuda"])
    clock.advance(5)
    # Same body: key order, tag order and requirement case do not matter.
    again = q.submit("t1", "x", {"b": [1, 2], "a": 1}, tags=["A", "B"], requires=["CUDA", "gpu"])
    assert again["submitted_at"] == first["submitted_at"]
    assert q.counts()["pending"] == 1
    assert len(q.list()) == 1
    # Still idempotent once the task has finished: no second task appears.
    grant = q.claim_next("w", ["gpu", "cuda"])
    assert grant is not None
    q.complete("t1", grant["lease_id"], {"ok": True})
    done = q.submit("t1", "x", {"a": 1, "b": [1, 2]}, tags=["A", "B"], requires=["gpu", "cuda"])
    assert done["status"] == "completed"
    assert q.counts() == {"pending": 0, "claimed": 0, "completed": 1, "failed": 0, "cancelled": 0}


@pytest.mark.parametrize(
    "change",
    [
        {"task_type": "other"},
        {"data": {"a": 2}},
        {"priority": 6},
        {"tags": ["P2P_ELIGIBLE"]},
        {"requires": ["gpu"]},
        {"max_attempts": 4},
        {"lease_seconds": 30},
    ],
)
def test_submit_same_id_different_body_conflicts(q: TaskQueue, change: dict[str, Any]) -> None:
    body: dict[str, Any] = {"task_type": "x", "data": {"a": 1}, "priority": 5, "tags": None,
                            "requires": None, "max_attempts": 3, "lease_seconds": 60}
    q.submit("t1", **body)
    with pytest.raises(ConflictError, match="t1"):
        q.submit("t1", **{**body, **change})
    assert q.status("t1")["data"] == {"a": 1}


@pytest.mark.parametrize("priority", [-1, 11, 5.0, True, "5", None])
def test_bad_priority(q: TaskQueue, priority: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="priority"):
        q.submit("t", "x", {}, priority=priority)


@pytest.mark.parametrize("data", [object(), b"bytes", {"x": float("nan")}, {1, 2}, {"f": len}])
def test_non_json_data(q: TaskQueue, data: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="JSON"):
        q.submit("t", "x", data)
    assert q.counts()["pending"] == 0


@pytest.mark.parametrize("task_id", ["", "   ", None, 5, "x" * 513])
def test_bad_task_id(q: TaskQueue, task_id: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="task_id"):
        q.submit(task_id, "x", {})


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task_type": ""},
        {"max_attempts": 0},
        {"max_attempts": 2.5},
        {"lease_seconds": 0},
        {"lease_seconds": float("inf")},
        {"tags": "GPU_PREFERRED"},
        {"tags": [""]},
        {"requires": [1]},
        {"data": _nested(5000)},  # RecursionError inside json, reported as bad input
    ],
)
def test_other_bad_arguments(q: TaskQueue, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"task_type": "x", "data": {}, **kwargs}
    with pytest.raises(InvalidArgumentError):
        q.submit("t", **args)


def test_data_nesting_limit_is_exact(q: TaskQueue) -> None:
    """Data as deep as the limit is kept and comes back; one level more is refused.

    A fixed limit far below Python's recursion limit, so a stored task encodes again in any
    call stack (daemon handler, trio task): near-limit data once made the control API 500.
    """
    q.submit("deep", "x", _nested(MAX_JSON_DEPTH))
    assert q.status("deep")["data"] == _nested(MAX_JSON_DEPTH)
    with pytest.raises(InvalidArgumentError, match=f"more than {MAX_JSON_DEPTH} levels"):
        q.submit("deeper", "x", _nested(MAX_JSON_DEPTH + 1))
    grant = q.claim_next("w", [])
    assert grant is not None and grant["task_id"] == "deep"
    with pytest.raises(InvalidArgumentError, match="nested"):
        q.complete("deep", grant["lease_id"], {"r": _nested(MAX_JSON_DEPTH)})
    assert q.status("deep")["status"] == "claimed"  # the bad result changed nothing
    q.complete("deep", grant["lease_id"], {"r": _nested(MAX_JSON_DEPTH - 1)})
    assert q.status("deep")["result"] == {"r": _nested(MAX_JSON_DEPTH - 1)}


def test_unknown_ids_raise_not_found(q: TaskQueue) -> None:
    q.submit("known", "x", {})
    calls = [
        lambda: q.status("nope"),
        lambda: q.claim("nope", "w"),
        lambda: q.heartbeat("nope", "lease"),
        lambda: q.complete("nope", "lease", {}),
        lambda: q.fail("nope", "lease", "boom"),
        lambda: q.cancel("nope"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError, match="nope"):
            call()


# ---------------------------------------------------------------------------- order
def test_submit_many_queues_a_batch_in_the_order_given(q: TaskQueue, clock: Clock) -> None:
    events: list[tuple[str, str]] = []
    q.add_listener(lambda e: events.append((e["event"], e["task_id"])))
    batch = [
        {"task_id": f"job-{n}", "task_type": "inference", "data": {"n": n}, "priority": 5}
        for n in (3, 1, 2)
    ]
    batch.append({"task_id": "urgent", "task_type": "inference", "data": {}, "priority": 9,
                  "tags": ["P2P_ELIGIBLE"], "requires": ["cuda"]})
    statuses = q.submit_many(batch)
    assert [s["task_id"] for s in statuses] == ["job-3", "job-1", "job-2", "urgent"]
    assert all(s["status"] == "pending" for s in statuses)
    assert statuses[3]["tags"] == ["P2P_ELIGIBLE"] and statuses[3]["requires"] == ["cuda"]
    assert events == [("submitted", s["task_id"]) for s in statuses]
    # Equal priorities in the order given (not by id); the higher priority first.
    order = []
    while (grant := q.claim_next("w", ["CUDA"])) is not None:
        order.append(grant["task_id"])
    assert order == ["urgent", "job-3", "job-1", "job-2"]
    # Idempotent item by item, like submit: nothing new, the same tasks come back.
    job_4 = {"task_id": "job-4", "task_type": "inference", "data": {"n": 4}}
    again = q.submit_many([*batch[:2], job_4])
    assert [s["status"] for s in again] == ["claimed", "claimed", "pending"]
    assert q.counts()["pending"] == 1 and q.submit_many([]) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"task_id": "t1", "task_type": "x", "data": {"other": "body"}},  # conflicts with t1
        {"task_id": "new", "task_type": "x", "data": {}, "priority": 11},
        {"task_id": "new", "task_type": "x"},  # no data
        {"task_id": "new", "task_type": "x", "data": {}, "colour": "red"},
        {"task_id": "new", "task_type": "x", "data": {}, "owner": "someone"},
        ["new", "x", {}],
        {"task_id": "dup", "task_type": "x", "data": {"n": 2}},  # dup below with another body
    ],
)
def test_submit_many_is_all_or_nothing(q: TaskQueue, bad: Any) -> None:
    q.submit("t1", "x", {"a": 1})
    batch = [{"task_id": "dup", "task_type": "x", "data": {"n": 1}},
             {"task_id": "fine", "task_type": "x", "data": {}}, bad]
    with pytest.raises(DatasetsError) as info:
        q.submit_many(batch)
    assert isinstance(info.value, (ConflictError, InvalidArgumentError))
    assert q.counts()["pending"] == 1  # only t1: no part of the batch was kept
    with pytest.raises(NotFoundError):
        q.status("fine")


def test_submit_many_same_task_twice_in_a_batch_is_one_task(q: TaskQueue) -> None:
    item = {"task_id": "t", "task_type": "x", "data": {"a": 1}}
    statuses = q.submit_many([item, dict(item)])
    assert [s["task_id"] for s in statuses] == ["t", "t"]
    assert q.counts()["pending"] == 1


def test_submit_many_refuses_oversized_batches(q: TaskQueue) -> None:
    from node.tasks._queue import MAX_BATCH

    items = ({"task_id": f"t{i}", "task_type": "x", "data": i} for i in range(MAX_BATCH + 1))
    with pytest.raises(InvalidArgumentError, match="split the batch"):
        q.submit_many(items)
    assert q.counts()["pending"] == 0


def test_order_priority_then_submit_time_then_id(q: TaskQueue, clock: Clock) -> None:
    q.submit("low", "x", {}, priority=1)
    clock.advance(1)
    q.submit("b-late", "x", {}, priority=5)
    clock.advance(1)
    q.submit("high", "x", {}, priority=9)
    clock.advance(-10)  # earlier submit time than everything above
    q.submit("c-early", "x", {}, priority=5)
    q.submit("a-early", "x", {}, priority=5)  # same time as c-early: the id decides
    clock.advance(20)
    order = []
    while (grant := q.claim_next("w", [])) is not None:
        order.append(grant["task_id"])
    assert order == ["high", "a-early", "c-early", "b-late", "low"]


def test_requires_are_hard_and_case_insensitive(q: TaskQueue) -> None:
    q.submit("needs-cuda", "x", {}, priority=9, requires=["CUDA"])
    q.submit("needs-both", "x", {}, priority=8, requires=["cuda", "fp16"])
    q.submit("plain", "x", {}, priority=1)
    assert q.claim_next("cpu-worker", ["cpu"])["task_id"] == "plain"
    assert q.claim_next("cpu-worker", ["cpu"]) is None  # never handed GPU-only work
    with pytest.raises(IncapableError, match="cuda"):
        q.claim("needs-cuda", "cpu-worker", ["cpu"])
    assert q.claim_next("gpu", ["Cuda"])["task_id"] == "needs-cuda"
    assert q.claim_next("gpu", ["Cuda"]) is None
    assert q.claim_next("gpu2", ["CUDA", "FP16", "extra"])["task_id"] == "needs-both"


def test_order_holds_across_requirement_sets(q: TaskQueue, clock: Clock) -> None:
    specs = [("r-a", ["a"], 3), ("r-b", ["b"], 9), ("r-ab", ["B", "a"], 6), ("r-none", None, 6),
             ("r-c", ["c"], 10), ("r-a2", ["a"], 9)]
    for task_id, requires, priority in specs:
        q.submit(task_id, "x", {}, priority=priority, requires=requires)
        clock.advance(1)
    order = []
    while (grant := q.claim_next("w", ["A", "b"])) is not None:
        order.append(grant["task_id"])
    assert order == ["r-b", "r-a2", "r-ab", "r-none", "r-a"]  # r-c needs "c": never


def test_requirement_sets_survive_pruning(q: TaskQueue) -> None:
    q.submit("tpu-1", "x", {}, requires=["tpu"])
    g = q.claim_next("w", ["tpu"])
    q.reap_expired()  # prunes unused claim groups; this one is still held
    q.complete("tpu-1", g["lease_id"], {})
    q.reap_expired()  # now nothing open uses it
    conn = sqlite3.connect(q.db_path)
    assert conn.execute("SELECT * FROM claim_groups").fetchall() == []
    conn.close()
    q.submit("tpu-2", "x", {}, requires=["TPU"])
    assert q.claim_next("w", ["tpu"])["task_id"] == "tpu-2"


def test_gpu_preferred_rule(q: TaskQueue, clock: Clock) -> None:
    q.submit("gpu-low", "x", {}, priority=2, tags=["GPU_PREFERRED"])
    q.submit("plain-high", "x", {}, priority=9)
    q.submit("plain-mid", "x", {}, priority=5)
    q.submit("gpu-high", "x", {}, priority=7, tags=["gpu_preferred"])
    # A GPU-capable worker takes GPU_PREFERRED tasks first, by priority, even over plain work.
    assert q.claim_next("g1", ["GPU", "CUDA"])["task_id"] == "gpu-high"
    assert q.claim_next("g2", ["rocm"])["task_id"] == "gpu-low"
    # A CPU worker takes plain work first ...
    q.submit("gpu-later", "x", {}, priority=10, tags=["GPU_PREFERRED"])
    assert q.claim_next("c1", ["cpu"])["task_id"] == "plain-high"
    assert q.claim_next("c2", [])["task_id"] == "plain-mid"
    # ... and GPU_PREFERRED work only when nothing else fits.
    assert q.claim_next("c3", ["cpu"])["task_id"] == "gpu-later"
    assert q.claim_next("c4", ["cpu"]) is None
    # With no GPU_PREFERRED work left, a GPU worker takes plain tasks.
    q.submit("plain-last", "x", {})
    assert q.claim_next("g3", ["mps"])["task_id"] == "plain-last"


def test_p2p_only_claims(q: TaskQueue) -> None:
    q.submit("local", "x", {}, priority=9)
    q.submit("shared", "x", {}, priority=1, tags=["P2P_ELIGIBLE"])
    assert q.claim_next("remote", [], p2p_only=True)["task_id"] == "shared"
    assert q.claim_next("remote", [], p2p_only=True) is None
    with pytest.raises(PeerDeniedError, match="P2P_ELIGIBLE"):
        q.claim("local", "remote", [], p2p_only=True)
    assert q.claim("local", "me", [])["task_id"] == "local"


def test_list_claimable_offers(q: TaskQueue) -> None:
    q.submit("a", "x", {}, priority=3, tags=["P2P_ELIGIBLE"])
    q.submit("b", "x", {}, priority=8, tags=["P2P_ELIGIBLE", "GPU_PREFERRED"])
    q.submit("c", "x", {}, priority=9, tags=["P2P_ELIGIBLE"], requires=["tpu"])
    q.submit("d", "x", {}, priority=10)  # local only
    assert [o["task_id"] for o in q.list_claimable()] == ["c", "b", "a"]
    assert [o["task_id"] for o in q.list_claimable(["cpu"])] == ["b", "a"]
    assert [o["task_id"] for o in q.list_claimable(["tpu"], limit=1)] == ["c"]
    assert [o["task_id"] for o in q.list_claimable(p2p_only=False)] == ["d", "c", "b", "a"]
    offer = q.list_claimable(["tpu"])[0]
    assert offer["requires"] == ["tpu"] and offer["attempt"] == 1 and offer["priority"] == 9
    assert q.claim_next("w", ["tpu"], p2p_only=True)["task_id"] == "c"
    assert [o["task_id"] for o in q.list_claimable(["tpu"])] == ["b", "a"]


# ---------------------------------------------------------------------------- leases
def test_grant_fields_and_heartbeat(q: TaskQueue, clock: Clock) -> None:
    q.submit("t", "infer", {"k": "v"}, priority=4, tags=["P2P_ELIGIBLE"], lease_seconds=30)
    grant = q.claim_next("w1", ["gpu"])
    assert grant is not None
    assert {k: grant[k] for k in ("task_id", "task_type", "data", "priority", "tags", "attempt")} \
        == {"task_id": "t", "task_type": "infer", "data": {"k": "v"}, "priority": 4,
            "tags": ["P2P_ELIGIBLE"], "attempt": 1}
    assert grant["lease_expires_at"] == clock.t + 30
    assert len(grant["lease_id"]) == 32
    st = q.status("t")
    assert st["status"] == "claimed" and st["worker_id"] == "w1"
    assert "lease_id" not in st  # the lease id is the holder's secret
    clock.advance(20)
    assert q.heartbeat("t", grant["lease_id"]) == clock.t + 30
    clock.advance(20)  # past the first expiry, within the renewed one
    assert q.status("t")["status"] == "claimed"
    assert q.complete("t", grant["lease_id"], {"ok": 1})["status"] == "completed"


def test_expired_lease_requeues_with_backoff_then_fails(q: TaskQueue, clock: Clock) -> None:
    q.submit("t", "x", {}, lease_seconds=10, max_attempts=3)
    g1 = q.claim_next("w1", [])
    clock.advance(10)  # expiry is at now >= lease_expires_at
    st = q.status("t")
    assert st["status"] == "pending" and st["attempt"] == 2 and st["worker_id"] is None
    assert st["available_at"] == clock.t + 1.0  # backoff 1 s before attempt 2
    assert "expired" in st["error"]
    assert q.claim_next("w2", []) is None  # still backing off
    with pytest.raises(TaskStateError, match="backoff"):
        q.claim("t", "w2", [])
    clock.advance(1.0)
    g2 = q.claim_next("w2", [])
    assert g2["attempt"] == 2 and g2["lease_id"] != g1["lease_id"]
    clock.advance(10)
    assert q.list("pending")[0]["available_at"] == clock.t + 2.0  # backoff doubles
    clock.advance(2.0)
    g3 = q.claim_next("w3", [])
    assert g3["attempt"] == 3
    clock.advance(10)
    st = q.status("t")
    assert st["status"] == "failed"
    assert st["error"] == "lease expired after 3 attempts"
    assert q.claim_next("w4", []) is None
    for lease in (g1, g2, g3):
        with pytest.raises(LeaseExpiredError):
            q.complete("t", lease["lease_id"], {"late": True})
    assert q.status("t")["result"] is None


def test_backoff_is_capped(db: Path, clock: Clock) -> None:
    with TaskQueue(db, clock=clock, backoff_base=2.0, backoff_max=5.0) as q:
        q.submit("t", "x", {}, max_attempts=10)
        waits = []
        for _ in range(4):
            grant = q.claim_next("w", [])
            st = q.fail("t", grant["lease_id"], "transient")
            waits.append(st["available_at"] - clock.t)
            clock.advance(waits[-1])
        assert waits == [2.0, 4.0, 5.0, 5.0]


def test_late_complete_is_fenced(q: TaskQueue, clock: Clock) -> None:
    q.submit("t", "x", {}, lease_seconds=5)
    old = q.claim_next("slow", [])
    clock.advance(5)
    assert q.reap_expired() == []  # requeued now (expiry is lazy), claimable after 1 s backoff
    clock.advance(1)
    new = q.claim_next("fast", [])
    assert new is not None and new["attempt"] == 2
    with pytest.raises(LeaseExpiredError, match="fast"):
        q.complete("t", old["lease_id"], {"by": "slow"})
    with pytest.raises(LeaseExpiredError):
        q.heartbeat("t", old["lease_id"])
    with pytest.raises(LeaseExpiredError):
        q.fail("t", old["lease_id"], "late failure")
    assert q.status("t")["status"] == "claimed"
    q.complete("t", new["lease_id"], {"by": "fast"})
    with pytest.raises(LeaseError):  # after the new holder finished, still refused
        q.complete("t", old["lease_id"], {"by": "slow"})
    st = q.status("t")
    assert st["result"] == {"by": "fast"} and st["worker_id"] == "fast"


def test_complete_on_an_expired_unreaped_lease_is_refused(q: TaskQueue, clock: Clock) -> None:
    q.submit("t", "x", {}, lease_seconds=5)
    grant = q.claim_next("w", [])
    clock.advance(6)  # nobody has looked since: the complete itself discovers the expiry
    with pytest.raises(LeaseExpiredError, match="expired"):
        q.complete("t", grant["lease_id"], {"late": True})
    st = q.status("t")
    assert st["status"] == "pending" and st["attempt"] == 2 and st["result"] is None


def test_wrong_lease_and_wrong_worker_are_refused(q: TaskQueue) -> None:
    q.submit("t", "x", {})
    q.submit("u", "x", {})
    grant = q.claim_next("w1", [])
    with pytest.raises(LeaseError) as info:
        q.complete(grant["task_id"], "0" * 32, {})
    assert not isinstance(info.value, LeaseExpiredError)
    with pytest.raises(LeaseError, match="w1"):
        q.complete(grant["task_id"], grant["lease_id"], {}, worker_id="w2")
    with pytest.raises(LeaseError, match="not claimed"):
        q.complete("u", grant["lease_id"], {})
    with pytest.raises(InvalidArgumentError):
        q.heartbeat(grant["task_id"], "")
    assert q.status(grant["task_id"])["status"] == "claimed"
    st = q.complete(grant["task_id"], grant["lease_id"], {"ok": 1}, worker_id="w1")
    assert st["status"] == "completed"


def test_complete_retry_is_idempotent_and_result_cid(q: TaskQueue) -> None:
    q.submit("t", "x", {})
    g = q.claim_next("w", [])
    with pytest.raises(InvalidCIDError):
        q.complete("t", g["lease_id"], {}, result_cid="Qm...")
    first = q.complete("t", g["lease_id"], {"n": 1}, result_cid=HELLO_CID)
    assert first["result_cid"] == HELLO_CID
    again = q.complete("t", g["lease_id"], {"n": 1}, result_cid=HELLO_CID)
    assert again["completed_at"] == first["completed_at"]
    assert again["repeated"] is True and "repeated" not in first
    with pytest.raises(ConflictError):
        q.complete("t", g["lease_id"], {"n": 2}, result_cid=HELLO_CID)
    with pytest.raises(TaskStateError):
        q.heartbeat("t", g["lease_id"])
    q.submit("v", "x", {})
    g = q.claim_next("w", [])
    with pytest.raises(InvalidArgumentError, match="JSON"):
        q.complete("v", g["lease_id"], {"bad": object()})
    assert q.status("v")["status"] == "claimed"


def test_fail_retryable_and_final(q: TaskQueue, clock: Clock) -> None:
    q.submit("t", "x", {}, max_attempts=2)
    g = q.claim_next("w", [])
    st = q.fail("t", g["lease_id"], "GPU out of memory")
    assert st["status"] == "pending" and st["attempt"] == 2 and st["error"] == "GPU out of memory"
    clock.advance(st["available_at"] - clock.t)
    g = q.claim_next("w", [])
    st = q.fail("t", g["lease_id"], RuntimeError("still broken"))
    assert st["status"] == "failed" and st["error"] == "still broken"  # attempts exhausted
    q.submit("u", "x", {})
    g = q.claim_next("w", [])
    st = q.fail("u", g["lease_id"], "bad input", retryable=False)
    assert st["status"] == "failed" and st["attempt"] == 1 and st["error"] == "bad input"
    repeat = q.fail("u", g["lease_id"], "bad input", retryable=False)  # the same report again
    assert repeat["status"] == "failed" and repeat["repeated"] is True


def test_cancel(q: TaskQueue) -> None:
    q.submit("p", "x", {})
    q.submit("c", "x", {})
    q.submit("d", "x", {})
    g = q.claim_next("w", [])
    assert q.cancel("p" if g["task_id"] != "p" else "c")["status"] == "cancelled"
    held = g["task_id"]
    assert q.cancel(held)["status"] == "cancelled"
    with pytest.raises(TaskStateError, match="cancelled"):
        q.complete(held, g["lease_id"], {})
    assert q.cancel(held)["status"] == "cancelled"  # idempotent
    g2 = q.claim_next("w", [])
    q.complete(g2["task_id"], g2["lease_id"], {})
    with pytest.raises(TaskStateError, match="completed"):
        q.cancel(g2["task_id"])


def test_claim_specific_task(q: TaskQueue) -> None:
    q.submit("t", "x", {}, requires=["gpu"])
    grant = q.claim("t", "w1", ["GPU"])
    assert grant["task_id"] == "t" and grant["worker_id"] == "w1"
    with pytest.raises(AlreadyClaimedError):
        q.claim("t", "w2", ["gpu"])
    q.complete("t", grant["lease_id"], {})
    with pytest.raises(TaskStateError, match="completed"):
        q.claim("t", "w2", ["gpu"])


def test_concurrent_claims_of_one_task_have_one_winner(db: Path) -> None:
    """Eight threads, each with its own TaskQueue (own connection) on the same file."""
    queues = [TaskQueue(db) for _ in range(8)]
    try:
        for i in range(20):
            queues[0].submit(f"t{i}", "x", {})
        for i in range(20):
            barrier = threading.Barrier(len(queues))
            outcomes: list[str] = []

            def race(queue: TaskQueue, n: int, task: str = f"t{i}",
                     barrier: threading.Barrier = barrier,
                     outcomes: list[str] = outcomes) -> None:
                barrier.wait()
                try:
                    queue.claim(task, f"w{n}", [])
                    outcomes.append("won")
                except AlreadyClaimedError:
                    outcomes.append("lost")

            threads = [threading.Thread(target=race, args=(qq, n)) for n, qq in enumerate(queues)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    finally:
        for qq in queues:
            qq.close()


# ---------------------------------------------------------------------------- queries
def test_list_counts_and_reap(q: TaskQueue, clock: Clock) -> None:
    for i in range(5):
        q.submit(f"t{i}", "x", {"i": i}, lease_seconds=10)
        clock.advance(0.1)
    assert [t["task_id"] for t in q.list(limit=3)] == ["t4", "t3", "t2"]
    g = q.claim_next("w", [])
    assert [t["task_id"] for t in q.list("claimed")] == [g["task_id"]]
    assert len(q.list("pending")) == 4
    with pytest.raises(InvalidArgumentError):
        q.list("bogus")
    with pytest.raises(InvalidArgumentError):
        q.list(limit=0)
    assert q.reap_expired() == []
    clock.advance(10)
    assert q.reap_expired() == []  # requeued, but backing off: not claimable yet
    assert q.counts()["pending"] == 5
    clock.advance(1)
    assert q.reap_expired() == [g["task_id"]]
    assert q.reap_expired() == []  # reported once


def test_listeners_see_every_committed_change(q: TaskQueue, clock: Clock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    events: list[dict[str, Any]] = []

    def broken(event: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    seen_states: list[str] = []

    def reentrant(event: dict[str, Any]) -> None:
        # Listeners run outside the queue's locks: calling back into the queue is fine.
        seen_states.append(q.status(event["task_id"])["status"])

    q.add_listener(broken)
    q.add_listener(events.append)
    q.add_listener(reentrant)
    with caplog.at_level(logging.ERROR, logger="node.tasks._queue"):
        q.submit("t", "infer", {}, priority=7, tags=["P2P_ELIGIBLE"], requires=["gpu"],
                 lease_seconds=5)
    assert "listener bug" in caplog.text
    q.submit("t", "infer", {}, priority=7, tags=["P2P_ELIGIBLE"], requires=["gpu"],
             lease_seconds=5)  # idempotent: no event
    g = q.claim_next("w1", ["gpu"])
    q.heartbeat("t", g["lease_id"])  # heartbeats are not events
    clock.advance(6)
    q.reap_expired()
    clock.advance(1)
    g = q.claim_next("w2", ["gpu"])
    q.complete("t", g["lease_id"], {"ok": True})
    q.submit("u", "x", {})
    q.cancel("u")
    assert [(e["event"], e["state"], e["attempt"], e["worker_id"]) for e in events] == [
        ("submitted", "pending", 1, None),
        ("claimed", "claimed", 1, "w1"),
        ("requeued", "pending", 2, None),
        ("claimed", "claimed", 2, "w2"),
        ("completed", "completed", 2, "w2"),
        ("submitted", "pending", 1, None),
        ("cancelled", "cancelled", 1, None),
    ]
    assert seen_states == [e["state"] for e in events]
    first = events[0]
    assert first["tags"] == ["P2P_ELIGIBLE"] and first["priority"] == 7
    assert first["task_type"] == "infer" and first["requires"] == ["gpu"]
    assert first["submitted_at"] == pytest.approx(clock.t - 7)
    q.remove_listener(events.append)
    q.submit("v", "x", {})
    assert events[-1]["task_id"] == "u"


# ---------------------------------------------------------------------------- durability
def test_state_survives_close_and_reopen(db: Path, clock: Clock) -> None:
    with TaskQueue(db, clock=clock) as q:
        q.submit("done", "x", {"n": 1}, priority=9)
        q.submit("held", "x", {"n": 2}, priority=8)
        q.submit("waiting", "x", {"n": 3}, priority=1, requires=["gpu"])
        g1 = q.claim_next("w", [])
        q.complete("done", g1["lease_id"], {"answer": 42}, result_cid=HELLO_CID)
        g2 = q.claim_next("w", [])
    with pytest.raises(DatasetsError, match="closed"):
        q.status("done")
    with TaskQueue(db, clock=clock) as q2:
        done = q2.status("done")
        assert done["status"] == "completed" and done["result"] == {"answer": 42}
        assert done["result_cid"] == HELLO_CID
        assert q2.status("held")["status"] == "claimed"
        assert q2.complete("held", g2["lease_id"], {"ok": True})["status"] == "completed"
        assert q2.claim_next("w", []) is None
        assert q2.claim_next("g", ["GPU"])["task_id"] == "waiting"
        with pytest.raises(ConflictError):
            q2.submit("done", "x", {"n": 2}, priority=9)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert json.loads(
        conn.execute("SELECT result FROM tasks WHERE task_id = 'done'").fetchone()[0]
    ) == {"answer": 42}
    conn.close()


def test_claims_use_the_indexes(q: TaskQueue) -> None:
    """The claim query is an index seek, not a scan or a sort, whatever the queue size."""
    q.submit("t", "x", {})
    conn = q._conn
    assert conn is not None
    plan = " ".join(
        row[-1]
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT priority, submitted_at, task_id FROM tasks "
            "INDEXED BY tasks_claimable WHERE state = 'pending' AND gpu_pref = ? "
            "AND requires_key = ? AND available_at <= ? "
            "ORDER BY priority DESC, submitted_at, task_id LIMIT 1",
            (0, "", 0.0),
        )
    )
    assert "USING INDEX tasks_claimable" in plan and "TEMP B-TREE" not in plan


def test_checkpoints_run_in_the_background_and_stop_with_the_queue(db: Path) -> None:
    # Automatic checkpoints are off; every 1,000 commits the queue's own thread copies the
    # WAL back into the database file, and close() stops that thread.
    queue = TaskQueue(db)
    initial = db.stat().st_size
    for i in range(1100):
        queue.submit(f"t{i:05d}", "x", {"i": i})
    threads = [t for t in threading.enumerate() if t.name.startswith("dsi-checkpoint-")]
    assert len(threads) == 1
    deadline = time.monotonic() + 20
    while db.stat().st_size <= initial and time.monotonic() < deadline:
        time.sleep(0.02)
    assert db.stat().st_size > initial, "no checkpoint copied the WAL into the database"
    queue.close()
    assert not threads[0].is_alive()
    with TaskQueue(db) as again:
        assert again.counts()["pending"] == 1100


def test_nonblocking_calls_raise_queue_busy_instead_of_waiting(db: Path) -> None:
    queue, other = TaskQueue(db), TaskQueue(db)
    try:
        queue.submit("t1", "x", {"n": 1})
        other._writer.acquire()  # another writer (its own lock file description) is busy
        try:
            with queue.nonblocking(), pytest.raises(QueueBusy):
                queue.claim_next("w", [])
            with queue.nonblocking(), pytest.raises(QueueBusy):
                queue.submit("t2", "x", {"n": 2})
            assert queue.status("t1")["status"] == "pending"  # reads never wait
        finally:
            other._writer.release()
        with pytest.raises(NotFoundError):
            queue.status("t2")  # the refused submit left nothing behind
        queue._mutex.acquire()  # another thread is inside this object
        try:
            with queue.nonblocking(), pytest.raises(QueueBusy):
                queue.status("t1")
        finally:
            queue._mutex.release()
        seen: list[str] = []

        def listener(event: dict[str, Any]) -> None:
            # Another thread is inside the queue for a moment: a listener's own call waits
            # for it, even though the call that committed ran in non-blocking mode.
            held = threading.Event()

            def hold() -> None:
                with queue._mutex:
                    held.set()
                    time.sleep(0.1)

            threading.Thread(target=hold).start()
            held.wait()
            seen.append(queue.status(event["task_id"])["status"])

        queue.add_listener(listener)
        with queue.nonblocking():
            grant = queue.claim_next("w", [])
            assert grant is not None and grant["task_id"] == "t1"
            queue.complete("t1", grant["lease_id"], {"ok": True})
        assert queue.status("t1")["status"] == "completed"
        assert seen == ["claimed", "completed"]
    finally:
        queue.close()
        other.close()


def test_the_log_is_rewound_under_steady_writes(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The WAL must not grow without bound while a worker keeps the queue busy: the
    background checkpoint finishes under the writer lock, so the next write starts the log
    from the top. (Before, 20,000 cycles left a 414 MiB log; here 2,000 would leave ~60.)"""
    import node.tasks._queue as queue_module

    monkeypatch.setattr(queue_module, "_CHECKPOINT_EVERY", 100)
    db = tmp_path / "steady.sqlite"
    wal = Path(f"{db}-wal")
    with TaskQueue(db) as queue:
        sizes = []
        for i in range(2000):
            queue.submit(f"t{i}", "x", {"i": i, "pad": "x" * 200})
            grant = queue.claim_next("w", [])
            assert grant is not None
            queue.complete(grant["task_id"], grant["lease_id"], {"ok": True})
            if i % 250 == 249:
                sizes.append(wal.stat().st_size)
        assert queue.counts()["completed"] == 2000
    assert max(sizes) < 16 << 20, [s >> 20 for s in sizes]
