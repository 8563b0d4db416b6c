"""P2P node tests in one process: real libp2p hosts on 127.0.0.1, real SQLite queues."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import trio

from node.errors import InvalidArgumentError, LeaseError, PeerDeniedError
from node.p2p import Node
from protocols.errors import ErrorResponse
from protocols.pb import task_pb2 as pb
from tests.p2p_helpers import FAST, start_nodes, wait_for

DATA = {"model": "bert", "batch_size": 32}
RESULT = {
    "status": "success",
    "output_cid": "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
}


async def test_line_claim_through_gossip_relay(tmp_path: Path) -> None:
    """A-B-C in a line: C hears A's offer only through B, dials A from owner_addrs, claims,
    completes, and A's queue shows C's result."""
    async with start_nodes(tmp_path, [[], [0], [1]]) as (a, b, c):
        assert a.peer_id not in c.connected_peers()
        await a.submit_task(
            task_id="infer-001",
            task_type="inference",
            data=DATA,
            priority=8,
            tags=["P2P_ELIGIBLE", "GPU_PREFERRED"],
        )
        await wait_for(lambda: "infer-001" in c.offers, what="offer relayed to C")
        assert a.peer_id not in c.connected_peers()  # heard through B, not directly
        heard = await b.get_task_status("infer-001")  # asked from A; the offer fills in
        assert heard["status"] == "pending" and heard["remote"] is True
        assert heard["owner"] == a.peer_id and heard["task_type"] == "inference"
        assert heard["priority"] == 8 and sorted(heard["tags"]) == ["GPU_PREFERRED", "P2P_ELIGIBLE"]
        assert "data" not in heard  # the owner keeps it; the wire's TaskStatus has none

        task = await c.get_next_task("worker-001", ["GPU", "CUDA"])
        assert task is not None
        assert task["task_id"] == "infer-001" and task["owner"] == a.peer_id
        assert task["data"] == DATA and task["priority"] == 8 and task["attempt"] == 1
        assert a.peer_id in c.connected_peers()  # dialled from the offer's owner_addrs
        held = await a.get_task_status("infer-001")
        assert held["status"] == "claimed" and held["worker_id"] == c.peer_id

        done = await c.complete_task("infer-001", RESULT)
        assert done["status"] == "completed"
        status = await a.get_task_status("infer-001")
        assert status["status"] == "completed"
        assert status["worker_id"] == c.peer_id and status["result"] == RESULT
        remote_view = await c.get_task_status("infer-001")
        assert remote_view["result"] == RESULT and remote_view["owner"] == a.peer_id
        # B relayed, never took part.
        assert (await b.status())["task_counts"]["completed"] == 0


async def test_simultaneous_claims_exactly_one_grant(tmp_path: Path) -> None:
    """Claims from four peers at once, several each: the owner grants exactly one."""
    async with start_nodes(tmp_path, [[], [0], [0], [0], [0]]) as nodes:
        owner, workers = nodes[0], nodes[1:]
        await owner.submit_task(task_id="race", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        owner_id = owner.host.get_id()
        outcomes: list[str] = []

        async def claim(worker: Node) -> None:
            try:
                grant = await worker.client.claim(owner_id, "race", [])
                outcomes.append(f"grant:{grant.lease_id}")
            except ErrorResponse as exc:
                outcomes.append(exc.code_name)

        async with trio.open_nursery() as nursery:
            for w in workers:
                for _ in range(4):
                    nursery.start_soon(claim, w)
        grants = [o for o in outcomes if o.startswith("grant:")]
        assert len(outcomes) == 16 and len(grants) == 1
        assert outcomes.count("ERROR_CODE_ALREADY_CLAIMED") == 15
        status = await owner.get_task_status("race")
        assert status["status"] == "claimed" and status["attempt"] == 1


async def test_remote_fail_and_automatic_lease_renewal(tmp_path: Path) -> None:
    async with start_nodes(tmp_path, [[], [0]]) as (a, c):
        # A 1-second lease outlives 2.5 s of work only because C renews it in the background.
        await a.submit_task(
            task_id="long", task_type="t", data={"n": 1}, tags=["P2P_ELIGIBLE"], lease_seconds=1
        )
        await a.submit_task(task_id="doomed", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        await wait_for(lambda: "long" in c.offers and "doomed" in c.offers, what="offers at C")
        first = await c.get_next_task("w1", [])
        second = await c.get_next_task("w2", [])
        assert first and second and {first["task_id"], second["task_id"]} == {"long", "doomed"}
        await trio.sleep(2.5)
        assert c.stats["lease_renewals"] >= 2
        assert (await a.get_task_status("long"))["status"] == "claimed"
        done = await c.complete_task("long", {"ok": True})
        assert done["status"] == "completed"
        with pytest.raises(LeaseError):  # fencing on the worker side too
            await c.fail_task("doomed", "boom", lease_id="not-the-lease")
        failed = await c.fail_task("doomed", "GPU fell off the bus", retryable=False)
        assert failed["status"] == "failed"
        st = await a.get_task_status("doomed")
        assert st["status"] == "failed" and st["error"] == "GPU fell off the bus"
        assert not c.holds("long") and not c.holds("doomed")


async def test_expired_lease_is_offered_again(tmp_path: Path) -> None:
    """A worker node that disappears with a lease: the owner reaps it, offers the task again
    on gossip, and another worker completes it."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        await a.submit_task(
            task_id="orphan", task_type="t", data={}, tags=["P2P_ELIGIBLE"], lease_seconds=1
        )
        async with start_nodes(tmp_path / "late", [[]]) as (c,):
            await c.connect(a.listen_addrs()[0])
            await wait_for(lambda: "orphan" in c.offers or c.offers.owners(), timeout=5)
            task = await c.get_next_task("w", [])
            assert task is not None and task["task_id"] == "orphan"
        # c is gone with its lease: after expiry (+1 s retry backoff) A offers it again.
        def reoffered() -> bool:
            ro = b.offers.get("orphan")
            return ro is not None and ro.offer.attempt == 2

        await wait_for(reoffered, timeout=10, what="re-offer after lease expiry")
        again = await b.get_next_task("w2", [])
        assert again is not None and again["task_id"] == "orphan" and again["attempt"] == 2
        await b.complete_task("orphan", {"second": True})
        st = await a.get_task_status("orphan")
        assert st["status"] == "completed" and st["worker_id"] == b.peer_id


async def test_bootstrap_peer_redialled_after_drop(tmp_path: Path) -> None:
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        assert b.stats["bootstrap_dials"] == 1
        await a.host.disconnect(b.host.get_id())
        await wait_for(lambda: b.stats["bootstrap_dials"] >= 2, what="redial")
        await wait_for(lambda: a.peer_id in b.connected_peers(), what="reconnected")
        await wait_for(lambda: a.peer_id in b.mesh_peers(), what="back in the mesh")
        status = await b.status()
        assert status["bootstrap_peers"] == [{"addr": a.listen_addrs()[0], "connected": True}]


async def test_an_owner_that_stops_answering_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_nodes(tmp_path, [[]]) as (a,):
        with caplog.at_level(logging.INFO, logger="dsi.p2p"):
            for _ in range(3):
                a._owner_unreachable("12D3KooWgone", "listing its offers", OSError("refused"))
            a._owner_answered("12D3KooWgone")
            a._owner_answered("12D3KooWgone")
            a._owner_unreachable("12D3KooWgone", "claiming t1", TimeoutError())
        lines = [r.getMessage() for r in caplog.records
                 if "12D3KooWgone" in r.getMessage() and r.levelno >= logging.INFO]
        assert len(lines) == 3, lines
        assert "does not answer (listing its offers: refused)" in lines[0]
        assert lines[1].endswith("answers again")
        assert "does not answer (claiming t1: TimeoutError)" in lines[2]
        assert "12D3KooWgone" in a._excluded_owners()


async def test_list_request_recovers_offers(tmp_path: Path) -> None:
    """Offers made while nobody listened are recovered by asking the owner (ListRequest)."""
    quiet = dataclasses.replace(FAST, reannounce_interval=3600)
    async with start_nodes(tmp_path, [[]], settings=quiet) as (a,):
        await a.submit_tasks(  # one batch: offered in the order given
            {"task_id": f"gpu-{i}", "task_type": "t", "data": {}, "tags": ["P2P_ELIGIBLE"],
             "requires": ["GPU"]}
            for i in range(5)
        )
        await trio.sleep(0.002)  # offers carry milliseconds: cpu-0 is strictly later
        await a.submit_task(task_id="cpu-0", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        await a.submit_task(task_id="local-only", task_type="t", data={})
        async with start_nodes(tmp_path / "c", [[]], settings=quiet) as (c,):
            await c.connect(a.listen_addrs()[0])
            await wait_for(lambda: c._candidate_owners(), what="identify of A")
            # Protocol level: the owner lists what these capabilities can take, P2P tasks only.
            listed = await c.client.list_offers(a.host.get_id(), ["cpu"])
            assert [o.task_id for o in listed] == ["cpu-0"]
            listed = await c.client.list_offers(a.host.get_id(), ["GPU"], limit=3)
            assert [o.task_id for o in listed] == ["gpu-0", "gpu-1", "gpu-2"]
            # Node level: make C deaf to gossip about these tasks (a tombstone from a newer
            # update rejects replayed offers); the owner's list still brings them back.
            ids = [f"gpu-{i}" for i in range(5)] + ["cpu-0"]
            for tid in ids:
                c.offers.apply_update(
                    pb.TaskUpdate(
                        task_id=tid, state=pb.TASK_STATE_CLAIMED, owner_peer_id=a.peer_id, attempt=9
                    )
                )
            assert c.remote_offers() == []
            assert await c.refresh_offers(["cpu"], force=True) == 1
            assert {o["task_id"] for o in c.remote_offers()} == {"cpu-0"}
            assert await c.refresh_offers(["gpu"], force=True) == 1
            ids = {o["task_id"] for o in c.remote_offers()}
            assert {f"gpu-{i}" for i in range(5)} <= ids and "local-only" not in ids
            task = await c.get_next_task("w", ["GPU"])
            assert task is not None and task["task_id"].startswith("gpu-")
            with pytest.raises(PeerDeniedError):  # never handed out: not P2P_ELIGIBLE
                await _claim(c, a, "local-only")


async def _claim(worker: Node, owner: Node, task_id: str) -> None:
    from node.p2p._errors import from_error_response

    try:
        await worker.client.claim(owner.host.get_id(), task_id, [])
    except ErrorResponse as exc:
        raise from_error_response(exc, owner.peer_id) from None


async def test_large_results_cross_and_oversized_ones_are_refused(tmp_path: Path) -> None:
    """A 3 MB result crosses yamux (windows refilled as it is read); over 4 MiB is refused
    before anything is sent."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, c):
        for tid in ("big", "huge"):
            await a.submit_task(task_id=tid, task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        await wait_for(lambda: "big" in c.offers and "huge" in c.offers, what="offers")
        for _ in range(2):
            assert await c.get_next_task("w", []) is not None
        blob = "x" * 3_000_000
        await c.complete_task("big", {"blob": blob})
        assert (await a.get_task_status("big"))["result"]["blob"] == blob
        with pytest.raises(InvalidArgumentError, match="result_cid"):
            await c.complete_task("huge", {"blob": "y" * 5_000_000})
        assert c.holds("huge")  # nothing was sent; the lease is still ours
        assert (await a.get_task_status("huge"))["status"] == "claimed"


async def test_pipelined_negotiation_edge_cases(tmp_path: Path) -> None:
    """The client pipelines multistream-select: a protocol the peer does not speak fails like
    ``host.new_stream`` (StreamFailure, nothing hangs), and a request too big to send before
    the protocol is accepted (> 64 KiB) still goes through after the echo."""
    from libp2p.host.exceptions import StreamFailure

    from protocols._exchange import exchange

    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        peer = a.host.get_id()
        req = pb.TaskRequest(status=pb.StatusRequest(task_id="x"))
        with pytest.raises(StreamFailure):
            await exchange(b.host, peer, "/dsi/nope/1.0.0", req, pb.TaskResponse, timeout=5)
        await a.submit_task(task_id="big", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        grant = await b.client.claim(peer, "big", [])
        result = b'{"blob": "' + b"x" * 200_000 + b'"}'  # sent after the protocol echo
        ack = await b.client.complete(peer, "big", grant.lease_id, result)
        assert ack.state == pb.TASK_STATE_COMPLETED
        assert len((await a.get_task_status("big"))["result"]["blob"]) == 200_000
