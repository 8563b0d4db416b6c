"""Interoperability with a peer built on stock py-libp2p 0.8.1, in both roles.

``tests/interop/stock_py_peer.py`` runs in its own process and imports nothing of dsi, so none of
dsi's py-libp2p workarounds are active there: the library's own multistream negotiation (one
round trip per step), yamux window updates, Noise framing, gossipsub and varint readers talk to
a dsi node that has them all installed. It shares only the generated code of
``proto/dsi/v1/task.proto``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from libp2p.peer.id import ID

from node.p2p import open_node
from tests.p2p_helpers import FAST, node_config, start_nodes, wait_for
from tests.p2p_procs import InteropPeer

STOCK_PEER = Path(__file__).resolve().parent / "interop" / "stock_py_peer.py"
DATA = {"model": "bert-base", "inputs": ["héllo", "wörld"]}
RESULT = {"status": "success", "scores": [0.5, -1.25], "by": "stock py-libp2p"}


@asynccontextmanager
async def stock_peer(role: str, args: list[str], log_dir: Path) -> AsyncIterator[InteropPeer]:
    peer = InteropPeer("stock-py", role, [sys.executable, str(STOCK_PEER), role, *args], log_dir)
    try:
        yield peer
    finally:
        peer.stop(timeout=5)


async def test_stock_worker_claims_and_completes_a_dsi_task(tmp_path: Path) -> None:
    """dsi owner, stock worker: gossip, ListRequest, claim (and a refused second claim),
    heartbeat, a fenced complete, the complete and a status, each over a stream the library
    negotiates its own way; the owner's queue shows the worker's peer id and result."""
    task_id = "interop-stock-worker-1"
    async with start_nodes(tmp_path, [[]]) as (owner,):
        await owner.submit_task(task_id=task_id, task_type="embedding", data=DATA, priority=7,
                                tags=["P2P_ELIGIBLE"])
        args = ["--connect", owner.listen_addrs()[0], "--task-id", task_id,
                "--result", json.dumps(RESULT), "--capabilities", "cpu"]
        async with stock_peer("worker", args, tmp_path / "logs") as peer:
            ready = await peer.wait("ready")
            assert ready["dsi_modules"] == []  # the library as published, no dsi workaround
            stock_id = ready["peer_id"]
            offer = await peer.wait("offer", timeout=30)
            assert offer["origin"] == offer["owner_peer_id"] == owner.peer_id
            assert offer["signed"] and offer["owner_addrs"] == owner.listen_addrs()
            assert offer["task_type"] == "embedding" and offer["priority"] == 7
            assert offer["tags"] == ["P2P_ELIGIBLE"] and offer["attempt"] == 1
            assert (await peer.wait("list"))["offers"] == [task_id]
            granted = await peer.wait("granted")
            assert granted["data"] == DATA and granted["attempt"] == 1
            assert granted["lease_expires_at_ms"] > time.time() * 1000
            again = (await peer.wait("claim_again"))["response"]
            assert again["code"] == "ERROR_CODE_ALREADY_CLAIMED"
            beat = (await peer.wait("heartbeat"))["response"]
            assert beat == {"body": "ack", "task_id": task_id, "state": "TASK_STATE_CLAIMED"}
            wrong = (await peer.wait("complete_wrong_lease"))["response"]
            assert wrong["code"] == "ERROR_CODE_NOT_LEASE_HOLDER"
            done = (await peer.wait("completed"))["response"]
            assert done == {"body": "ack", "task_id": task_id, "state": "TASK_STATE_COMPLETED"}
            status = await peer.wait("status")
            assert status["state"] == "TASK_STATE_COMPLETED"
            assert status["worker_peer_id"] == stock_id and status["result"] == RESULT
            unknown = (await peer.wait("status_unknown"))["response"]
            assert unknown["code"] == "ERROR_CODE_NOT_FOUND"
            await peer.wait("done")
            await wait_for(lambda: peer.proc.poll() is not None, what="stock worker exit")
        assert peer.proc.returncode == 0, peer.stderr_tail()

        st = await owner.get_task_status(task_id)
        assert st["status"] == "completed" and st["worker_id"] == stock_id
        assert st["result"] == RESULT and st["attempt"] == 1
        assert owner.stats["served_claims"] == 1 and owner.stats["served_completes"] == 1


async def test_dsi_worker_takes_a_task_from_a_stock_owner(tmp_path: Path) -> None:
    """Stock owner, dsi worker: the offer crosses gossip from the stock router; the worker
    claims with its normal API (pipelined negotiation against the library's listener), renews
    the 3 s lease by heartbeat and completes; the owner saw every request from the worker's
    authenticated peer id."""
    task_id = "interop-stock-owner-1"
    args = ["--task-id", task_id, "--task-type", "inference", "--data", json.dumps(DATA),
            "--priority", "6", "--lease-seconds", "3"]
    async with stock_peer("owner", args, tmp_path / "logs") as peer:
        ready = await peer.wait("ready")
        assert ready["dsi_modules"] == []
        stock_id, stock_addr = ready["peer_id"], ready["addrs"][0]
        assert stock_addr.startswith("/ip4/127.0.0.1/tcp/")
        async with AsyncExitStack() as stack:
            cfg = node_config(tmp_path / "worker", bootstrap_peers=[stock_addr])
            worker = await stack.enter_async_context(open_node(cfg, settings=FAST))
            await wait_for(lambda: stock_id in worker.connected_peers(), what="dialled stock")
            await wait_for(lambda: task_id in worker.offers, timeout=20, what="stock offer")
            heard = worker.offers.get(task_id)
            assert heard is not None and heard.owner == stock_id and not heard.listed
            assert worker.stats["announcements_rejected"] == 0

            task = await worker.get_next_task("py-worker-1", [])
            assert task is not None and task["remote"] is True and task["owner"] == stock_id
            assert task["task_id"] == task_id and task["data"] == DATA
            assert task["priority"] == 6 and task["attempt"] == 1
            claim = await peer.wait("claim", predicate=lambda e: e["granted"])
            assert claim["by"] == worker.peer_id and claim["lease_id"] == task["lease_id"]

            await peer.wait("heartbeat", timeout=10)  # the node renews the 3 s lease itself
            await trio.sleep(3.5)
            done = await worker.complete_task(task_id, RESULT)
            assert done["status"] == "completed" and done["owner"] == stock_id
            completed = await peer.wait("completed")
            assert completed["by"] == worker.peer_id and completed["result"] == RESULT

            st = await worker.get_task_status(task_id)
            assert st["remote"] is True and st["status"] == "completed"
            assert st["worker_id"] == worker.peer_id and st["result"] == RESULT
            assert ID.from_base58(stock_id) in [ID.from_base58(p) for p in
                                                worker.connected_peers()]
        await peer.wait("done", timeout=15)
        await wait_for(lambda: peer.proc.poll() is not None, what="stock owner exit")
    assert peer.proc.returncode == 0, peer.stderr_tail()
    assert not peer.all("stream_error") and not peer.all("rejected")
    assert {e["by"] for e in peer.all("request")} == {worker.peer_id}
