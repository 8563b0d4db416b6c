"""Interoperability with js-libp2p: a peer written with another libp2p implementation speaks
our wire contract in both directions.

The js peer (``tests/interop/js-peer/peer.mjs``: js-libp2p 2.x, TCP on 127.0.0.1, Noise,
yamux, identify, gossipsub with StrictSign) loads ``proto/dsi/v1/task.proto`` at run time with
protobufjs and prints one JSON object per line for each event. Nothing here skips: without
``node`` or the peer's ``node_modules`` the tests fail with the command to run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from node.p2p import open_node
from protocols.errors import ErrorResponse
from protocols.pb import task_pb2 as pb
from tests.p2p_helpers import FAST, node_config, start_nodes, wait_for
from tests.p2p_procs import InteropPeer

JS_PEER_DIR = Path(__file__).resolve().parent / "interop" / "js-peer"
JS_PEER = JS_PEER_DIR / "peer.mjs"
INSTALL_HINT = f"run `scripts/setup --test` (or `cd {JS_PEER_DIR} && npm ci`)"

DATA = {"model": "bert-base", "inputs": ["héllo", "wörld"], "batch_size": 4}
RESULT = {"status": "success", "embeddings": [[0.25, -1.5], [3.0, 0.0]], "by": "js-libp2p"}


@pytest.fixture
def node_bin() -> str:
    """The Node.js binary, with the js peer's packages installed (fails loudly, never skips)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"`node` (Node.js >= 20) is required for the js-libp2p interop tests: {INSTALL_HINT}",
            pytrace=False,
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 20:
        pytest.fail(f"Node.js >= 20 is required, found {version!r}: {INSTALL_HINT}", pytrace=False)
    for package in ("libp2p", "@chainsafe/libp2p-gossipsub", "protobufjs"):
        if not (JS_PEER_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(
                f"the js interop peer is not installed ({package} missing): {INSTALL_HINT}",
                pytrace=False,
            )
    return node


class JsPeer(InteropPeer):
    """One ``peer.mjs`` process."""

    def __init__(
        self, node_bin: str, role: str, args: list[str], log_dir: Path, timeout: float
    ) -> None:
        super().__init__(
            "js",
            role,
            [node_bin, str(JS_PEER), role, "--timeout", str(timeout), *args],
            log_dir,
            cwd=JS_PEER_DIR,
            env=dict(os.environ, NODE_OPTIONS=""),
        )


@asynccontextmanager
async def js_peer(
    node_bin: str, role: str, args: list[str], log_dir: Path, timeout: float = 60.0
) -> AsyncIterator[JsPeer]:
    peer = JsPeer(node_bin, role, args, log_dir, timeout)
    try:
        yield peer
    finally:
        peer.stop(timeout=5)


async def test_js_worker_claims_and_completes_a_python_task(
    tmp_path: Path, node_bin: str
) -> None:
    """Python owner, js worker: the offer crosses gossip (py -> js) and ListRequest; js claims
    (two claims at once: one grant, one ALREADY_CLAIMED), heartbeats, is fenced off with a
    wrong lease id, completes; the owner's queue shows js's result and js's peer id."""
    task_id = "interop-py-owner-1"
    async with start_nodes(tmp_path, [[]]) as (owner,):
        await owner.submit_task(
            task_id=task_id,
            task_type="embedding",
            data=DATA,
            priority=7,
            tags=["P2P_ELIGIBLE", "GPU_PREFERRED"],
        )
        args = [
            "--connect", owner.listen_addrs()[0],
            "--task-id", task_id,
            "--result", json.dumps(RESULT),
            "--capabilities", "cpu,gpu",
            "--wait-gossip", "20",
        ]
        async with js_peer(node_bin, "worker", args, tmp_path / "logs") as js:
            ready = await js.wait("ready")
            js_id = ready["peer_id"]
            connected = await js.wait("connected")
            assert connected["peer_id"] == owner.peer_id
            done = await js.wait("done", timeout=45)
            assert done["task_id"] == task_id and done["peer_id"] == js_id

            # Gossip py -> js: a StrictSign message whose body names its signed origin.
            offer = await js.wait("offer", predicate=lambda e: e["task_id"] == task_id)
            assert offer["signed"] and offer["origin"] == owner.peer_id
            assert offer["origin_matches"]
            assert offer["owner_addrs"] == owner.listen_addrs()
            assert offer["task_type"] == "embedding" and offer["priority"] == 7
            assert sorted(offer["tags"]) == ["GPU_PREFERRED", "P2P_ELIGIBLE"]
            assert offer["attempt"] == 1 and offer["submitted_at_ms"] > 0
            assert not js.all("gossip_missed")
            # ListRequest (lazy multistream negotiation from js).
            listed = (await js.wait("list"))["offers"]
            assert [o["task_id"] for o in listed] == [task_id]
            assert listed[0]["owner_peer_id"] == owner.peer_id

            claims = await js.wait("claims")
            assert claims["grants"] == 1
            assert [r["code"] for r in claims["refusals"]] == ["ERROR_CODE_ALREADY_CLAIMED"]
            granted = await js.wait("granted")
            assert granted["task_id"] == task_id and granted["task_type"] == "embedding"
            assert granted["data"] == DATA and granted["attempt"] == 1
            assert granted["lease_expires_at_ms"] > time.time() * 1000
            heartbeat = await js.wait("heartbeat")
            assert heartbeat["response"] == {"body": "ack"}
            assert heartbeat["state"] == "TASK_STATE_CLAIMED"
            wrong = await js.wait("complete_wrong_lease")
            assert wrong["code"] == "ERROR_CODE_NOT_LEASE_HOLDER"
            completed = await js.wait("completed")
            assert completed == {
                "event": "completed", "task_id": task_id, "state": "TASK_STATE_COMPLETED"
            }
            status = await js.wait("status")
            assert status["state"] == "TASK_STATE_COMPLETED"
            assert status["worker_peer_id"] == js_id and status["result"] == RESULT

        st = await owner.get_task_status(task_id)
        assert st["status"] == "completed"
        assert st["worker_id"] == js_id
        assert st["result"] == RESULT
        assert st["attempt"] == 1
        assert owner.stats["served_claims"] == 1 and owner.stats["served_completes"] == 1


@pytest.mark.slow
async def test_python_worker_takes_a_task_from_a_js_owner(
    tmp_path: Path, node_bin: str
) -> None:
    """js owner, Python worker: the offer crosses gossip (js -> py); the worker claims it with
    its normal API, renews the lease by heartbeat, completes it through the js owner, and the
    js owner saw every request from the worker's authenticated peer id (and refused a
    complete with the right lease id from another peer)."""
    task_id = "interop-js-owner-1"
    args = [
        "--task-id", task_id,
        "--task-type", "inference",
        "--data", json.dumps(DATA),
        "--priority", "6",
        "--tags", "P2P_ELIGIBLE",
        "--lease-seconds", "3",
    ]
    async with js_peer(node_bin, "owner", args, tmp_path / "logs") as js:
        ready = await js.wait("ready")
        js_id, js_addr = ready["peer_id"], ready["addrs"][0]
        assert js_addr.startswith("/ip4/127.0.0.1/tcp/") and js_addr.endswith(f"/p2p/{js_id}")
        async with AsyncExitStack() as stack:
            cfg = node_config(tmp_path / "worker", bootstrap_peers=[js_addr])
            worker = await stack.enter_async_context(open_node(cfg, settings=FAST))
            await wait_for(lambda: js_id in worker.connected_peers(), what="worker dialled js")
            # Gossip js -> py only: nothing asked for work yet, so nothing listed offers.
            await wait_for(lambda: task_id in worker.offers, timeout=20, what="js offer on gossip")
            heard = worker.offers.get(task_id)
            assert heard is not None and not heard.listed
            assert heard.owner == js_id and list(heard.offer.owner_addrs) == ready["addrs"]
            assert heard.offer.priority == 6 and heard.offer.attempt == 1
            assert worker.stats["announcements_rejected"] == 0  # js messages pass our validator

            task = await worker.get_next_task("py-worker-1", [])
            assert task is not None and task["remote"] is True
            assert task["task_id"] == task_id and task["owner"] == js_id
            assert task["task_type"] == "inference" and task["data"] == DATA
            assert task["attempt"] == 1 and task["priority"] == 6
            assert 1.0 < task["lease_seconds"] <= 3.5
            claim = await js.wait("claim", predicate=lambda e: e["granted"])
            assert claim["from"] == worker.peer_id and claim["lease_id"] == task["lease_id"]

            # A second claim, even from the holder, is refused by the js owner.
            with pytest.raises(ErrorResponse) as refused:
                await worker.client.claim(ID.from_base58(js_id), task_id, [])
            assert refused.value.code == pb.ERROR_CODE_ALREADY_CLAIMED

            # Another peer with the right lease id is not the lease holder: the js owner checks
            # the stream's authenticated remote peer, not a message field.
            intruder = await stack.enter_async_context(
                open_node(node_config(tmp_path / "intruder"), settings=FAST)
            )
            js_peer_id = await intruder.connect(js_addr)
            assert js_peer_id == js_id
            with pytest.raises(ErrorResponse) as fenced:
                await intruder.client.complete(
                    ID.from_base58(js_id),
                    task_id,
                    task["lease_id"],
                    b'{"forged": true}',
                )
            assert fenced.value.code == pb.ERROR_CODE_NOT_LEASE_HOLDER
            rejected = await js.wait("rejected", predicate=lambda e: e["op"] == "complete")
            assert rejected["from"] == intruder.peer_id
            assert rejected["lease_id"] == task["lease_id"]

            # The worker node renews its 3 s lease in the background (HeartbeatRequest).
            await js.wait("heartbeat", timeout=10, predicate=lambda e: e["from"] == worker.peer_id)
            await trio.sleep(3.5)  # past the first lease: only renewals keep it
            assert not js.all("lease_expired")

            done = await worker.complete_task(task_id, RESULT)
            assert done["status"] == "completed" and done["owner"] == js_id
            assert not worker.holds(task_id)
            completed = await js.wait("completed")
            assert completed["from"] == worker.peer_id
            assert completed["lease_id"] == task["lease_id"]
            assert completed["result"] == RESULT

            # StatusRequest to the js owner through the normal API.
            st = await worker.get_task_status(task_id)
            assert st["remote"] is True and st["owner"] == js_id
            assert st["status"] == "completed" and st["worker_id"] == worker.peer_id
            assert st["result"] == RESULT

        assert js.proc.poll() is None  # still serving: it lingers after the completion
        assert len([e for e in js.all("claim") if e["granted"]]) == 1
        assert all(e["from"] in (worker.peer_id, intruder.peer_id) for e in js.all("request"))
        assert not js.all("stream_error")
