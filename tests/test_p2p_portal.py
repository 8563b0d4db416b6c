"""The sync face of the P2P node (P2PHandle) and the P2P-off guarantee."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node.errors import ConfigError, LeaseError
from node.p2p.portal import P2PHandle
from node.services import acquire_services, release_services
from tests.p2p_helpers import FAST, node_config

REPO = Path(__file__).resolve().parent.parent


def wait_sync(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def test_portal_two_nodes_sync_api(tmp_path: Path) -> None:
    owner_services = acquire_services(node_config(tmp_path / "owner"))
    owner = P2PHandle.start(owner_services, FAST)
    try:
        status = owner.status()
        assert status["peer_id"] == owner_services.peer_id
        assert status["listen_addrs"][0].endswith(f"/p2p/{owner.peer_id}")
        assert status["listen_addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
        worker_services = acquire_services(
            node_config(tmp_path / "worker", bootstrap_peers=[status["listen_addrs"][0]])
        )
        worker = P2PHandle.start(worker_services, FAST)
        try:
            wait_sync(lambda: owner.peer_id in worker.status()["mesh_peers"], what="mesh")
            # Submitted through the plain synchronous queue, as the facade does.
            owner_services.tasks.submit(
                "infer-001", "inference", {"model": "bert", "batch_size": 32}, priority=8,
                tags=["P2P_ELIGIBLE", "GPU_PREFERRED"], owner=owner.peer_id,
            )
            wait_sync(lambda: worker.remote_offers(), what="offer at the worker")
            task = worker.get_next_task("worker-001", ["GPU", "CUDA"])
            assert task is not None and task["task_id"] == "infer-001"
            assert worker.holds("infer-001") and not owner.holds("infer-001")
            assert worker.heartbeat("infer-001") > time.time()
            with pytest.raises(LeaseError):
                worker.complete_task("infer-001", {"x": 1}, lease_id="wrong")
            worker.complete_task("infer-001", {"status": "success", "duration_ms": 5000})
            assert owner.get_task_status("infer-001")["result"]["status"] == "success"
            assert worker.get_task_status("infer-001")["status"] == "completed"
            counts = owner.status()["task_counts"]
            assert counts["completed"] == 1
            assert worker.status()["connected_peers"] == [owner.peer_id]
        finally:
            started = time.monotonic()
            worker.stop()
            assert time.monotonic() - started < 5  # clean and quick
            worker.stop()  # idempotent
            release_services(worker_services)
    finally:
        owner.stop()
        release_services(owner_services)


def test_start_refuses_when_p2p_is_off(tmp_path: Path) -> None:
    services = acquire_services(node_config(tmp_path, enable_p2p=False))
    try:
        with pytest.raises(ConfigError, match="enable_p2p"):
            P2PHandle.start(services)
    finally:
        release_services(services)


def test_p2p_off_opens_no_socket_and_never_imports_libp2p(tmp_path: Path) -> None:
    """With enable_p2p off the node is purely local: no libp2p import, no socket."""
    script = textwrap.dedent(
        f"""
        import os, sys
        from node.config import build_config
        from node.services import acquire_services, release_services
        import protocols
        cfg = build_config({{"cache_dir": {str(tmp_path)!r}, "enable_p2p": False}})
        s = acquire_services(cfg)
        s.tasks.submit("t1", "x", {{}}, tags=["P2P_ELIGIBLE"])
        grant = s.tasks.claim_next("w", [])
        s.tasks.complete("t1", grant["lease_id"], {{"ok": True}})
        sockets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{{fd}}").startswith("socket:"):
                    sockets.append(fd)
            except OSError:
                pass  # the directory listing's own descriptor
        print("libp2p" in sys.modules, len(sockets), s.p2p_running)
        release_services(s)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0", "False"]


def test_one_host_per_data_directory(tmp_path: Path) -> None:
    from node.errors import NodeRunningError

    services = acquire_services(node_config(tmp_path))
    handle = P2PHandle.start(services, FAST)
    try:
        script = textwrap.dedent(
            f"""
            import trio
            from node.p2p import open_node
            from node.config import build_config
            from node.errors import NodeRunningError
            async def main():
                try:
                    async with open_node(build_config({{"cache_dir": {str(tmp_path)!r},
                            "listen_addrs": ["/ip4/127.0.0.1/tcp/0"]}})):
                        print("started")
                except NodeRunningError as exc:
                    print("refused:", exc)
            trio.run(main)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.startswith("refused:"), out.stdout + out.stderr
        with pytest.raises(NodeRunningError):
            P2PHandle.start(services, FAST)  # and twice in one process neither
    finally:
        handle.stop()
        release_services(services)


def test_busy_listen_address_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        services = acquire_services(
            node_config(tmp_path, listen_addrs=[f"/ip4/127.0.0.1/tcp/{port}"])
        )
        try:
            with pytest.raises(ConfigError, match="could not listen"):
                P2PHandle.start(services, FAST)
            assert not services.p2p_running
        finally:
            release_services(services)
