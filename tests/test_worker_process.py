"""`dsi-node worker` as a real process attached to a running daemon: drain and abort."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.daemon.testing import (
    PACKAGE_ROOT,
    NodeProcess,
    child_env,
    cli_command,
    free_port,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[NodeProcess]:
    env = {"IPFS_API": f"/ip4/127.0.0.1/tcp/{free_port()}"}
    proc = NodeProcess(tmp_path / "node", env=env).start().wait_ready()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def workers(tmp_path: Path, daemon: NodeProcess) -> Iterator[Callable[..., Any]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"worker-{len(procs)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cli_command("--cache-dir", str(daemon.cache_dir), "worker", "--handler",
                            "examples.echo_worker:handle", "--poll", "0.2", *args),
                env=child_env(), stdout=fh, stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT)
        procs.append(proc)
        return proc, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def wait_for(pred: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_drains_on_sigterm(daemon: NodeProcess, workers: Callable[..., Any]) -> None:
    c = daemon.client()
    c.submit("long", "sleep", {"seconds": 3}, lease_seconds=1)
    proc, log = workers("--worker-id", "drainer")
    wait_for(lambda: c.task("long")["status"] == "claimed", what="claim")
    c.submit("next", "echo", {"n": 1})  # the only slot is busy: not claimed before SIGTERM
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    st = c.task("long")
    # Finished after the signal, on its first attempt: heartbeats through the daemon kept the
    # 1-second lease alive for the whole 3 seconds.
    assert st["status"] == "completed" and st["attempt"] == 1, st
    assert st["result"]["output"]["heartbeats"] >= 2
    assert c.task("next")["status"] == "pending"
    text = log.read_text()
    assert "draining 1 running task(s)" in text and "worker drainer stopped" in text
    # The execution is in the daemon's provenance, linked from the result.
    rec = c.record(st["result"]["provenance_cid"])
    assert rec["task_id"] == "long" and rec["worker_id"] == "drainer"
    assert rec["node"] == daemon.client().health()["peer_id"]


def test_second_signal_hands_tasks_back(daemon: NodeProcess,
                                        workers: Callable[..., Any]) -> None:
    c = daemon.client()
    c.submit("stuck", "sleep", {"seconds": 120})
    proc, log = workers("-n", "2")
    wait_for(lambda: c.task("stuck")["status"] == "claimed", what="claim")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining" in log.read_text(), what="drain to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    st = c.task("stuck")
    assert st["status"] == "pending" and st["attempt"] == 2
    assert "worker stopped before the task finished" in st["error"]


def test_failures_and_concurrency_through_the_daemon(daemon: NodeProcess,
                                                     workers: Callable[..., Any]) -> None:
    c = daemon.client()
    c.submit("boom", "fail", {"message": "CUDA out of memory"}, max_attempts=1)
    for i in range(4):
        c.submit(f"wc-{i}", "wordcount", {"text": "x " * i})
    proc, _ = workers("-n", "3", "--capabilities", "CPU")
    wait_for(lambda: len(c.tasks("completed")["tasks"]) == 4, what="four completions")
    wait_for(lambda: c.task("boom")["status"] == "failed", what="the failure")
    assert c.task("boom")["error"] == "RuntimeError: CUDA out of memory"
    assert [c.task(f"wc-{i}")["result"]["output"]["words"] for i in range(4)] == [0, 1, 2, 3]
    recs = c.logs({"type": "worker_execution", "task_id": "boom"})["records"]
    assert recs[0]["data"]["error"] == "RuntimeError: CUDA out of memory"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0


def test_embedded_p2p_worker_owns_the_directory(tmp_path: Path) -> None:
    """No daemon and P2P on: the worker runs its own host and takes the daemon lock, so a
    `dsi-node run` on the same directory is refused instead of starting a second host."""
    from node.daemon.testing import run_cli

    data = tmp_path / "embedded"
    env = {"IPFS_API": f"/ip4/127.0.0.1/tcp/{free_port()}"}
    run_cli("--cache-dir", str(data), "submit", "--id", "e-1", "--type", "echo", env=env)
    log = tmp_path / "embedded-worker.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cli_command("--cache-dir", str(data), "worker", "--handler",
                        "examples.echo_worker:handle", "--poll", "0.2", "--enable-p2p",
                        "--listen", "/ip4/127.0.0.1/tcp/0"),
            env=child_env(env), stdout=fh, stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT)
    try:
        wait_for(lambda: "task e-1 completed" in log.read_text(), what="the embedded worker")
        assert "running an in-process node with its own P2P host" in log.read_text()
        refused = run_cli("--cache-dir", str(data), "run", "--control-addr", "127.0.0.1:0",
                          env=env, check=False)
        assert refused.returncode == 1
        assert (f"another dsi-node worker with its own P2P host (pid {proc.pid})"
                in refused.stderr)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    st = run_cli("--cache-dir", str(data), "task", "e-1", "--json", env=env)
    assert '"status": "completed"' in st.stdout
