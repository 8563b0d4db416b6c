"""The P2P task queue across separate OS processes on 127.0.0.1 (tests/p2p_peer.py)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.tasks import TaskQueue
from tests.p2p_procs import Swarm, free_port

pytestmark = pytest.mark.slow


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def owner_queue(swarm: Swarm, name: str) -> TaskQueue:
    return TaskQueue(swarm.base / name / "tasks.sqlite")


def test_line_of_processes(swarm: Swarm) -> None:
    """A-B-C as processes: C hears A's offer through B, dials A, completes it."""
    a = swarm.start("a", "owner", "--tasks", "1", "--prefix", "line", "--wait-peers", "1")
    a.wait_ready()
    b = swarm.start("b", "relay", "--bootstrap", a.addr)
    b.wait_ready()
    c = swarm.start("c", "worker", "--bootstrap", b.addr, "--worker-id", "c")
    c.wait_ready()
    done = c.wait_event("completed", timeout=30)
    assert done["task_id"] == "line-0"
    assert c.of("claimed")[0]["owner"] == a.peer_id
    a.wait_event("all_done", timeout=15)
    with owner_queue(swarm, "a") as q:
        st = q.status("line-0")
    assert st["status"] == "completed" and st["worker_id"] == c.peer_id
    assert st["result"] == {"worker": "c-0", "peer": c.peer_id}


def test_four_workers_race_over_500_tasks(swarm: Swarm) -> None:
    """1 owner, 4 worker processes (two of them one hop away): each task completed once."""
    n = 500
    owner = swarm.start("owner", "owner", "--tasks", str(n), "--wait-peers", "2")
    owner.wait_ready()
    # 20 ms of work per task: without it the two direct workers could drain all 500 tasks
    # (about 2 s) before the two behind a relay have heard of the owner on gossip.
    work = ["--work-seconds", "0.02"]
    w1 = swarm.start("w1", "worker", "--bootstrap", owner.addr, "--worker-id", "w1", *work)
    w2 = swarm.start("w2", "worker", "--bootstrap", owner.addr, "--worker-id", "w2", *work)
    w1.wait_ready()
    w2.wait_ready()
    w3 = swarm.start("w3", "worker", "--bootstrap", w1.addr, "--worker-id", "w3", *work)
    w4 = swarm.start("w4", "worker", "--bootstrap", w2.addr, "--worker-id", "w4", *work)
    workers = [w1, w2, w3, w4]
    owner.wait_event("all_done", timeout=150)
    # The owner has all n results; let the workers print their last "completed" lines
    # (a completion's answer can still be in flight when the owner reports all done).
    wait_until(lambda: sum(len(w.of("completed")) for w in workers) >= n, 15, "worker reports")
    for w in workers:
        w.stop()
    completed = collections.Counter(e["task_id"] for w in workers for e in w.of("completed"))
    claimed = collections.Counter(e["task_id"] for w in workers for e in w.of("claimed"))
    expected = {f"task-{i}" for i in range(n)}
    assert set(completed) == expected, f"lost: {sorted(expected - set(completed))[:10]}"
    assert max(completed.values()) == 1, "a task was completed twice"
    assert max(claimed.values()) == 1, "a task was granted twice"
    with owner_queue(swarm, "owner") as q:
        assert q.counts()["completed"] == n
    # Every worker took part (the two behind a relay reached the owner too).
    assert all(w.of("completed") for w in workers), [len(w.of("completed")) for w in workers]


def test_killed_worker_task_completed_by_another(swarm: Swarm) -> None:
    owner = swarm.start(
        "owner", "owner", "--tasks", "1", "--prefix", "k", "--lease-seconds", "1",
        "--wait-peers", "1",
    )
    owner.wait_ready()
    slow = swarm.start(
        "slow", "worker", "--bootstrap", owner.addr, "--work-seconds", "300", "--worker-id", "s"
    )
    slow.wait_ready()
    slow.wait_event("claimed", timeout=30)
    slow.kill()  # SIGKILL mid-task: no goodbye, the lease just stops being renewed
    other = swarm.start("other", "worker", "--bootstrap", owner.addr, "--worker-id", "o")
    other.wait_ready()
    done = other.wait_event("completed", timeout=30)
    assert done["task_id"] == "k-0" and done["attempt"] == 2
    owner.wait_event("all_done", timeout=15)
    with owner_queue(swarm, "owner") as q:
        st = q.status("k-0")
    assert st["status"] == "completed" and st["worker_id"] == other.peer_id
    assert st["attempt"] == 2


def test_owner_killed_and_restarted(swarm: Swarm) -> None:
    """SIGKILL the owner mid-run; restarted on the same data and port, it offers its
    unfinished tasks again, the worker redials it, and every task completes."""
    n = 30
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    args = ["--tasks", str(n), "--prefix", "r", "--lease-seconds", "2", "--wait-peers", "1"]
    owner = swarm.start("owner", "owner", *args, listen=listen)
    owner.wait_ready()
    worker = swarm.start(
        "worker", "worker", "--bootstrap", owner.addr, "--work-seconds", "0.05",
        "--concurrency", "2",
    )
    worker.wait_ready()
    worker.wait_for(
        lambda e: e["event"] == "completed" and len(worker.of("completed")) >= 5, 30, "5 done"
    )
    owner.kill()
    restarted = swarm.start("owner-again", "owner", listen=listen, data="owner")
    assert restarted.wait_ready()["peer_id"] == owner.peer_id  # same identity, same data
    restarted.wait_event("all_done", timeout=60)
    with owner_queue(swarm, "owner") as q:
        counts = q.counts()
        assert counts["completed"] == n and counts["failed"] == 0
        results = [q.status(f"r-{i}")["result"]["peer"] for i in range(n)]
    assert set(results) == {worker.peer_id}
