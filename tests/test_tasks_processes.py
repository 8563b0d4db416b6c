"""The task queue shared by real OS processes: no task granted twice, none lost, crash safety.

Workers are started with the ``spawn`` context (fresh interpreters, nothing inherited), each
with its own TaskQueue on the same SQLite file, and report what they did through files.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from node.errors import AlreadyClaimedError, LeaseExpiredError
from node.tasks import TaskQueue

pytestmark = pytest.mark.slow
CTX = mp.get_context("spawn")
DEADLINE = 120.0  # seconds; a safety net against hangs, never a performance assertion


# ---------------------------------------------------------------------------- child processes
def worker_main(db: str, worker_id: str, caps: list[str], out: str, stop_flag: str) -> None:
    """Claim -> complete until the queue is drained and the submitter says it is done.

    Every grant is appended to ``out`` *before* completing, so a task granted twice shows
    up twice even if the second completion were refused.
    """
    q = TaskQueue(db)
    with open(out, "a", encoding="utf-8") as log:
        while True:
            grant = q.claim_next(worker_id, caps)
            if grant is None:
                if os.path.exists(stop_flag) and q.counts()["pending"] == 0:
                    break
                time.sleep(0.002)
                continue
            log.write(grant["task_id"] + "\n")
            log.flush()
            q.complete(grant["task_id"], grant["lease_id"], {"by": worker_id})
    q.close()


def hold_and_hang(db: str, out: str) -> None:
    """Claim one task, report the lease, then hang mid-task until killed."""
    q = TaskQueue(db)
    grant = q.claim_next("doomed", [])
    Path(out + ".tmp").write_text(json.dumps(grant), encoding="utf-8")
    os.replace(out + ".tmp", out)
    time.sleep(600)


def submit_forever(db: str, out: str) -> None:
    """Submit until killed; an id is written to ``out`` only after submit() returned."""
    q = TaskQueue(db)
    with open(out, "a", encoding="utf-8") as log:
        i = 0
        while True:
            q.submit(f"burst-{i}", "x", {"i": i, "pad": "p" * 200}, priority=i % 11)
            log.write(f"burst-{i}\n")
            log.flush()
            i += 1


def race_claims(db: str, ids: list[str], worker_id: str, out: str, start_at: float) -> None:
    q = TaskQueue(db)
    while time.time() < start_at:
        time.sleep(0.001)
    won = []
    for task_id in ids:
        try:
            q.claim(task_id, worker_id, [])
            won.append(task_id)
        except AlreadyClaimedError:
            pass
    Path(out).write_text("\n".join(won), encoding="utf-8")


# ---------------------------------------------------------------------------- helpers
def _wait(procs: list[Any]) -> None:
    end = time.monotonic() + DEADLINE
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} worker process(es) did not finish"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split() if path.exists() else []


# ---------------------------------------------------------------------------- tests
def test_eight_workers_complete_every_task_exactly_once(tmp_path: Path) -> None:
    n_workers, per_worker = 8, 2000
    total = n_workers * per_worker
    db = tmp_path / "tasks.sqlite"
    stop_flag = tmp_path / "submitted-all"
    q = TaskQueue(db)

    def submit(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            # Mixed priorities, GPU preference and hard requirements: order and matching are
            # exercised while the workers race.
            tags = ["GPU_PREFERRED"] if i % 5 == 0 else None
            requires = ["gpu"] if i % 7 == 0 else None
            q.submit(f"task-{i:05d}", "noop", {"i": i}, priority=i % 11, tags=tags,
                     requires=requires)

    submit(0, total // 2)
    procs = []
    for n in range(n_workers):
        caps = ["GPU", "CUDA"] if n % 2 == 0 else ["cpu"]
        p = CTX.Process(
            target=worker_main,
            args=(str(db), f"w{n}", caps, str(tmp_path / f"w{n}.log"), str(stop_flag)),
        )
        p.start()
        procs.append(p)
    submit(total // 2, total)  # the second half races with the workers
    stop_flag.touch()
    _wait(procs)

    grants: Counter[str] = Counter()
    granted_to: dict[str, str] = {}
    for n in range(n_workers):
        for task_id in _lines(tmp_path / f"w{n}.log"):
            grants[task_id] += 1
            granted_to[task_id] = f"w{n}"
    duplicates = [t for t, c in grants.items() if c > 1]
    lost = total - len(grants)
    assert duplicates == [] and lost == 0, f"duplicates={len(duplicates)} lost={lost}"
    assert q.counts() == {"pending": 0, "claimed": 0, "completed": total, "failed": 0,
                          "cancelled": 0}
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT task_id, worker_id, result, attempt FROM tasks").fetchall()
    conn.close()
    assert len(rows) == total
    for task_id, worker_id, result, attempt in rows:
        assert json.loads(result) == {"by": worker_id} == {"by": granted_to[task_id]}
        assert attempt == 1
    # Hard requirements held under concurrency: GPU-only tasks went to GPU workers only.
    for i in range(0, total, 7):
        assert int(granted_to[f"task-{i:05d}"][1:]) % 2 == 0
    q.close()


def test_sigkilled_worker_task_reruns_after_lease_expiry(tmp_path: Path) -> None:
    db = tmp_path / "tasks.sqlite"
    q = TaskQueue(db, backoff_base=0.2)
    q.submit("victim", "x", {"payload": 1}, lease_seconds=1, max_attempts=3)
    lease_file = tmp_path / "lease.json"
    doomed = CTX.Process(target=hold_and_hang, args=(str(db), str(lease_file)))
    doomed.start()
    end = time.monotonic() + DEADLINE
    while not lease_file.exists():
        assert time.monotonic() < end and doomed.is_alive(), "the worker never claimed"
        time.sleep(0.01)
    held = json.loads(lease_file.read_text(encoding="utf-8"))
    assert held["task_id"] == "victim" and held["attempt"] == 1
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(DEADLINE)
    assert doomed.exitcode == -signal.SIGKILL
    assert q.status("victim")["status"] == "claimed"  # the lease outlives its holder ...

    # ... until it expires: a second worker process then gets the task and completes it.
    stop_flag = tmp_path / "stop"
    stop_flag.touch()
    rescuer_log = tmp_path / "rescuer.log"
    while q.status("victim")["status"] == "claimed":
        assert time.monotonic() < end, "the lease never expired"
        time.sleep(0.05)
    rescuer = CTX.Process(
        target=worker_main, args=(str(db), "rescuer", [], str(rescuer_log), str(stop_flag))
    )
    rescuer.start()
    _wait([rescuer])
    assert _lines(rescuer_log) == ["victim"]
    st = q.status("victim")
    assert st["status"] == "completed" and st["attempt"] == 2
    assert st["worker_id"] == "rescuer" and st["result"] == {"by": "rescuer"}
    with pytest.raises(LeaseExpiredError):  # the dead worker's lease can never report
        q.complete("victim", held["lease_id"], {"by": "doomed"})
    assert q.status("victim")["result"] == {"by": "rescuer"}
    q.close()


def test_sigkill_during_a_submit_burst_keeps_every_acknowledged_task(tmp_path: Path) -> None:
    db = tmp_path / "tasks.sqlite"
    acked = tmp_path / "acked.log"
    child = CTX.Process(target=submit_forever, args=(str(db), str(acked)))
    child.start()
    end = time.monotonic() + DEADLINE
    while len(_lines(acked)) < 300:
        assert time.monotonic() < end and child.is_alive()
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join(DEADLINE)
    ids = _lines(acked)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with TaskQueue(db) as q:
        for task_id in ids:
            assert q.status(task_id)["status"] == "pending"
        # The queue is fully usable after the crash.
        grant = q.claim_next("w", [])
        assert grant is not None and grant["priority"] == 10
        q.complete(grant["task_id"], grant["lease_id"], {})


def test_concurrent_claims_across_processes_have_one_winner(tmp_path: Path) -> None:
    db = tmp_path / "tasks.sqlite"
    ids = [f"t{i}" for i in range(300)]
    with TaskQueue(db) as q:
        for task_id in ids:
            q.submit(task_id, "x", {}, tags=["P2P_ELIGIBLE"])
    start_at = time.time() + 1.5  # after all four interpreters have started
    procs = []
    for n in range(4):
        order = ids if n % 2 == 0 else list(reversed(ids))
        p = CTX.Process(
            target=race_claims, args=(str(db), order, f"w{n}", str(tmp_path / f"won{n}"), start_at)
        )
        p.start()
        procs.append(p)
    _wait(procs)
    wins = Counter(t for n in range(4) for t in _lines(tmp_path / f"won{n}"))
    assert sorted(wins) == sorted(ids)
    assert set(wins.values()) == {1}
