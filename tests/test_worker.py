"""Worker mode in-process: claim -> execute -> complete, heartbeats, failures, drain, abort."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.echo_worker import handle as example_handle
from node.config import build_config
from node.daemon.api import NodeAPI
from node.daemon.testing import free_port
from node.errors import InvalidArgumentError
from node.services import acquire_services, release_services
from node.worker import RECORD_TYPE, TaskContext, TaskFailed, Worker, WorkResult, load_handler
from protocols.codec import MAX_JSON_DEPTH

HELLO_V0 = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[NodeAPI]:
    cfg = build_config(cache_dir=tmp_path / "node", ipfs_api=f"/ip4/127.0.0.1/tcp/{free_port()}")
    services = acquire_services(cfg)
    try:
        yield NodeAPI(services)
    finally:
        release_services(services)


class Running:
    """A worker in a background thread, always stopped by the test's end."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.stats: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.stats = self.worker.run()

    def stop(self, drain: bool = True, timeout: float = 60) -> Any:
        self.worker.stop(drain=drain)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker did not stop"
        return self.stats


@pytest.fixture
def start_worker(api: NodeAPI) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(handler: Any, **kwargs: Any) -> Running:
        kwargs.setdefault("poll_interval", 0.1)
        r = Running(Worker(handler, api, worker_id="w-test", **kwargs))
        started.append(r)
        return r

    yield start
    for r in started:
        if r.thread.is_alive():
            r.stop(drain=False)


def wait_for(pred: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def status_is(api: NodeAPI, task_id: str, *states: str) -> Callable[[], bool]:
    return lambda: api.task(task_id)["status"] in states


def test_success_records_result_and_provenance(api: NodeAPI, start_worker: Any) -> None:
    api.submit("wc-1", "wordcount", {"text": "to be or not to be"})
    run = start_worker(example_handle, capabilities=["CPU"])
    wait_for(status_is(api, "wc-1", "completed"), what="completion")
    stats = run.stop()
    st = api.task("wc-1")
    result = st["result"]
    assert result["status"] == "success"
    assert result["output"]["words"] == 6
    assert result["worker_id"] == "w-test" and st["worker_id"] == "w-test"
    assert isinstance(result["duration_ms"], int)
    # The execution's provenance record is linked from the result and queryable by task.
    recs = api.logs({"type": RECORD_TYPE, "task_id": "wc-1"})["records"]
    assert [r["cid"] for r in recs] == [result["provenance_cid"]]
    rec = recs[0]
    assert rec["worker_id"] == "w-test"
    assert rec["data"]["status"] == "completed" and rec["data"]["task_type"] == "wordcount"
    assert rec["node"] == api.services.peer_id
    assert api.verify()["ok"] is True
    assert stats.completed == 1 and stats.failed == 0 and stats.claimed == 1


def test_output_cid_becomes_result_cid(api: NodeAPI, start_worker: Any) -> None:
    api.submit("cid-1", "make", {})
    start_worker(lambda task: WorkResult({"made": True}, HELLO_V0))
    wait_for(status_is(api, "cid-1", "completed"), what="completion")
    st = api.task("cid-1")
    assert st["result_cid"] == HELLO_V0 and st["result"]["output_cid"] == HELLO_V0
    rec = api.record(st["result"]["provenance_cid"])
    assert rec["output_cid"] == HELLO_V0


def test_failure_keeps_exception_text_and_retries(api: NodeAPI, start_worker: Any) -> None:
    api.submit("f-1", "fail", {"message": "model weights missing"}, max_attempts=2)
    api.submit("f-2", "fail_permanently", {"message": "input is not an image"})
    run = start_worker(example_handle, concurrency=2)
    wait_for(status_is(api, "f-2", "failed"), what="permanent failure")
    wait_for(lambda: api.task("f-1")["attempt"] == 2 or api.task("f-1")["status"] == "failed",
             what="a retry")
    wait_for(status_is(api, "f-1", "failed"), what="retries exhausted")  # backoff 1 s
    stats = run.stop()
    f1, f2 = api.task("f-1"), api.task("f-2")
    assert f1["error"] == "RuntimeError: model weights missing" and f1["attempt"] == 2
    assert f2["error"] == "input is not an image" and f2["attempt"] == 1
    recs = api.logs({"type": RECORD_TYPE, "task_id": "f-1"})["records"]
    assert len(recs) == 2
    assert {r["data"]["error"] for r in recs} == {"RuntimeError: model weights missing"}
    assert all(r["data"]["status"] == "failed" for r in recs)
    assert stats.failed == 3


def test_non_json_output_fails_without_retry(api: NodeAPI, start_worker: Any) -> None:
    api.submit("nj-1", "x", {})
    start_worker(lambda task: {"value": float("nan")})
    wait_for(status_is(api, "nj-1", "failed"), what="failure")
    assert "JSON cannot hold" in api.task("nj-1")["error"]


def test_too_deep_output_fails_without_retry(api: NodeAPI, start_worker: Any) -> None:
    def deep(task: dict[str, Any]) -> Any:
        value: Any = 1
        for _ in range(MAX_JSON_DEPTH + 1):
            value = [value]
        return value

    api.submit("deep-1", "x", {}, max_attempts=3)
    start_worker(deep)
    wait_for(status_is(api, "deep-1", "failed"), what="failure")
    task = api.task("deep-1")
    assert f"more than {MAX_JSON_DEPTH} levels" in task["error"] and task["attempt"] == 1


def test_heartbeats_keep_a_long_task(api: NodeAPI, start_worker: Any) -> None:
    # The handler runs ~3 lease lengths: without heartbeats the lease would expire and another
    # worker would get the task.
    api.submit("hb-1", "sleep", {"seconds": 3}, lease_seconds=1)
    run = start_worker(example_handle)
    wait_for(status_is(api, "hb-1", "claimed"), what="claim")
    while api.task("hb-1")["status"] == "claimed":
        assert api.claim("thief", []) is None
        time.sleep(0.1)
    run.stop()
    st = api.task("hb-1")
    assert st["status"] == "completed" and st["attempt"] == 1
    assert st["result"]["output"]["heartbeats"] >= 2


def test_concurrency_runs_n_tasks_at_once(api: NodeAPI, start_worker: Any) -> None:
    gate = threading.Event()
    active, peak = [0], [0]
    lock = threading.Lock()

    def handler(task: dict[str, Any]) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        gate.wait(60)
        with lock:
            active[0] -= 1
        return task["task_id"]

    for i in range(5):
        api.submit(f"c-{i}", "block", {})
    run = start_worker(handler, concurrency=3)
    wait_for(lambda: peak[0] == 3, what="three tasks running")
    assert len(api.tasks("claimed")["tasks"]) == 3  # the fourth waits for a free slot
    gate.set()
    wait_for(lambda: len(api.tasks("completed")["tasks"]) == 5, what="all tasks")
    assert run.stop().completed == 5 and peak[0] == 3


def test_drain_finishes_running_tasks_and_claims_no_more(api: NodeAPI,
                                                         start_worker: Any) -> None:
    started = threading.Event()
    release = threading.Event()

    def handler(task: dict[str, Any]) -> str:
        started.set()
        release.wait(60)
        return "done"

    api.submit("d-1", "x", {}, priority=9)
    api.submit("d-2", "x", {}, priority=1)
    run = start_worker(handler)
    assert started.wait(60)
    run.worker.stop(drain=True)
    release.set()
    stats = run.stop()
    assert api.task("d-1")["status"] == "completed"
    assert api.task("d-2")["status"] == "pending"
    assert stats.claimed == 1 and stats.completed == 1


def test_abort_hands_running_tasks_back(api: NodeAPI, start_worker: Any) -> None:
    seen: list[TaskContext] = []
    gate = threading.Event()

    def handler(task: dict[str, Any], ctx: TaskContext) -> str:
        seen.append(ctx)
        gate.wait(60)  # a handler that does not look at ctx.cancelled
        return "too late"

    api.submit("a-1", "x", {}, max_attempts=3)
    run = start_worker(handler)
    wait_for(lambda: seen, what="task start")
    stats = run.stop(drain=False)
    st = api.task("a-1")
    assert st["status"] == "pending" and st["attempt"] == 2, st
    assert "worker stopped before the task finished" in st["error"]
    assert stats.handed_back == 1 and stats.completed == 0
    assert seen[0].cancelled.is_set()
    gate.set()  # the late result is dropped: the task stays handed back
    for t in threading.enumerate():
        if t.name == "dsi-task-a-1":
            t.join(60)
    assert api.task("a-1")["status"] == "pending"


def test_lost_lease_discards_the_result(api: NodeAPI, start_worker: Any) -> None:
    seen: list[TaskContext] = []

    def handler(task: dict[str, Any], ctx: TaskContext) -> str:
        seen.append(ctx)
        assert ctx.cancelled.wait(60), "the handler was not told the lease is gone"
        return "too late"

    api.submit("l-1", "x", {}, lease_seconds=1)
    run = start_worker(handler)
    wait_for(lambda: seen, what="task start")
    api.cancel("l-1")  # the next heartbeat learns the task is gone
    wait_for(lambda: run.worker.stats.lost == 1, what="lost lease noticed")
    run.stop()
    assert api.task("l-1")["status"] == "cancelled"
    assert seen[0].lost_reason
    recs = api.logs({"type": RECORD_TYPE, "task_id": "l-1"})["records"]
    assert recs and recs[0]["data"]["status"] == "lost"


def test_handler_errors_raise_clearly() -> None:
    with pytest.raises(InvalidArgumentError, match="MODULE:FUNCTION"):
        load_handler("no_colon")
    with pytest.raises(InvalidArgumentError, match="cannot import"):
        load_handler("surely_not_a_module_xyz:run")
    with pytest.raises(InvalidArgumentError, match="has no attribute"):
        load_handler("examples.echo_worker:nothing_here")
    assert load_handler("examples.echo_worker:handle") is example_handle
    with pytest.raises(TaskFailed):
        example_handle({"task_type": "unknown", "data": {}}, TaskContext({"task_id": "x"}, "w"))
