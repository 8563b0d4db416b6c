"""End to end: three `dsi-node run` processes bootstrapped to each other from config files.

A task submitted with the CLI on A is executed by `dsi-node worker` attached to B; its status
and the worker's signed provenance record are visible from C (status asked from the owner over
/dsi/task/1.0.0; the record fetched from the shared Kubo-compatible daemon by CID and its
signature checked against B's peer id).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.daemon.testing import NodeProcess, free_port, run_cli, run_cli_json

pytestmark = pytest.mark.slow


class Swarm:
    def __init__(self, root: Path, ipfs_api: str) -> None:
        self.names = ("a", "b", "c")
        self.dirs = {n: root / n for n in self.names}
        self.ids: dict[str, str] = {}
        self.procs: dict[str, NodeProcess] = {}
        for n in self.names:
            self.ids[n] = run_cli_json("--cache-dir", str(self.dirs[n]), "init")["peer_id"]
        ports = {n: free_port() for n in self.names}
        self.addrs = {n: f"/ip4/127.0.0.1/tcp/{ports[n]}/p2p/{self.ids[n]}" for n in self.names}
        for n in self.names:
            boot = [self.addrs[m] for m in self.names if m != n]
            # Replace the file init wrote: everything the node needs comes from its config.
            (self.dirs[n] / "config.toml").write_text(
                f"enable_p2p = true\n"
                f'listen_addrs = ["/ip4/127.0.0.1/tcp/{ports[n]}"]\n'
                f"bootstrap_peers = {json.dumps(boot)}\n"
                f'ipfs_api = "{ipfs_api}"\n'
                f'control_addr = "127.0.0.1:0"\n'
                f"shutdown_grace = 1.0\n")

    def cli(self, n: str, *args: str, **kw: Any) -> Any:
        return run_cli("--cache-dir", str(self.dirs[n]), *args, **kw)

    def cli_json(self, n: str, *args: str, **kw: Any) -> Any:
        return run_cli_json("--cache-dir", str(self.dirs[n]), *args, **kw)

    def start(self) -> None:
        for n in self.names:
            # NodeProcess passes --control-addr 127.0.0.1:0 too: a flag over the same file value.
            self.procs[n] = NodeProcess(self.dirs[n]).start()
        for n in self.names:
            self.procs[n].wait_ready(timeout=120)

    def stop(self) -> dict[str, int | None]:
        return {n: p.stop() for n, p in self.procs.items()}


@pytest.fixture
def swarm(tmp_path: Path, kubo: Any) -> Iterator[Swarm]:
    s = Swarm(tmp_path, kubo.api)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def wait_for(pred: Any, timeout: float = 90, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_daemons_submit_work_and_observe(swarm: Swarm) -> None:
    a, b = swarm.ids["a"], swarm.ids["b"]
    # The daemons log their full multiaddrs, and found each other from the config files.
    for n in swarm.names:
        assert f"listening on {swarm.addrs[n]}" in swarm.procs[n].log()
        assert swarm.cli_json(n, "id")["addrs"] == [swarm.addrs[n]]

    def connected(n: str) -> bool:
        peers = {p["peer_id"] for p in swarm.cli_json(n, "peers")["peers"]}
        return peers == {swarm.ids[m] for m in swarm.names if m != n}

    for n in swarm.names:
        wait_for(lambda n=n: connected(n), what=f"{n} connected to both others")

    st = swarm.cli_json("a", "submit", "--id", "e2e-1", "--type", "wordcount", "--data",
                        '{"text": "the quick brown fox jumps over the lazy dog"}',
                        "--tag", "P2P_ELIGIBLE", "--priority", "8")
    assert st["status"] == "pending" and st["owner"] == a

    stats = json.loads(swarm.cli(
        "b", "worker", "--handler", "examples.echo_worker:handle", "--max-tasks", "1",
        "--worker-id", "gpu-box-1", "--capabilities", "GPU,CUDA", "--poll", "0.5", "--json",
        timeout=180).stdout)
    assert stats["completed"] == 1 and stats["failed"] == 0

    # From C, which neither owns nor ran the task: the owner's answer.
    seen = swarm.cli_json("c", "task", "e2e-1")
    assert seen["status"] == "completed" and seen["owner"] == a and seen["worker_id"] == b
    assert seen["result"]["output"]["words"] == 9
    assert seen["result"]["worker_id"] == "gpu-box-1"
    assert swarm.cli_json("c", "task", "e2e-1", "--owner", a)["status"] == "completed"
    # ... and the execution's provenance: written and signed by B, fetched by CID on C.
    prov = seen["result"]["provenance_cid"]
    record = swarm.cli_json("c", "logs", "--cid", prov)
    assert record["cid"] == prov and record["node"] == b
    assert record["type"] == "worker_execution" and record["task_id"] == "e2e-1"
    assert record["data"]["status"] == "completed" and record["data"]["owner"] == a
    checked = swarm.cli_json("c", "verify", prov)
    assert checked["ok"] is True and checked["node"] == b
    # The owner holds the same final state; B's own chain verifies.
    owned = swarm.cli_json("a", "task", "e2e-1")
    assert owned["status"] == "completed" and owned["result"] == seen["result"]
    assert swarm.cli_json("b", "verify")["ok"] is True
    # Human-readable output for the same facts.
    assert "status       completed" in swarm.cli("c", "task", "e2e-1").stdout
    assert "worker_execution" in swarm.cli("b", "logs").stdout

    for n in ("c", "b", "a"):
        swarm.procs[n].signal(signal.SIGTERM)
        assert swarm.procs[n].wait(timeout=60) == 0
