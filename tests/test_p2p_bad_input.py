"""Hostile and malformed input on /dsi/task/1.0.0 against a real owner node and queue.

Each bad request must get an Error response or a reset, change nothing, and leave the owner
serving the next, valid request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from node.p2p import Node
from protocols import announce
from protocols.codec import parse_strict
from protocols.errors import ErrorResponse, FrameError
from protocols.framing import MAX_FRAME_SIZE, encode_frame, encode_uvarint, read_frame
from protocols.pb import task_pb2 as pb
from protocols.task import PROTOCOL_ID
from tests.p2p_helpers import start_nodes, wait_for


async def exchange(src: Node, dst: Node, data: bytes) -> pb.TaskResponse | str:
    """Send raw bytes on a fresh stream, half-close, return the response or "reset"."""
    from libp2p.network.stream.exceptions import StreamError

    with trio.fail_after(10):
        stream = await src.host.new_stream(dst.host.get_id(), [PROTOCOL_ID])
        try:
            await stream.write(data)
            await stream.close_write()
            frame = await read_frame(stream)
        except (FrameError, StreamError):
            return "reset"
        finally:
            with trio.move_on_after(1):
                await stream.reset()
    return parse_strict(pb.TaskResponse, frame)


def code_of(resp: pb.TaskResponse | str) -> str:
    if isinstance(resp, str):
        return resp
    assert resp.WhichOneof("body") == "error", resp
    return pb.ErrorCode.Name(resp.error.code)


async def snapshot(owner: Node) -> tuple[Any, ...]:
    def read() -> tuple[Any, ...]:
        return (owner.tasks.status("held"), owner.tasks.status("free"), owner.tasks.counts())

    return await trio.to_thread.run_sync(read)


async def test_bad_requests_change_nothing(tmp_path: Path) -> None:
    async with start_nodes(tmp_path, [[], [0], [0]]) as (owner, holder, attacker):
        await owner.submit_task(task_id="held", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        await owner.submit_task(task_id="free", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
        grant = await holder.client.claim(owner.host.get_id(), "held", [])
        before = await snapshot(owner)

        def frame(req: pb.TaskRequest) -> bytes:
            return encode_frame(req.SerializeToString())

        offer = pb.TaskOffer(task_id="free", task_type="t", owner_peer_id=owner.peer_id)
        cases: dict[str, tuple[bytes, set[str]]] = {
            "garbage bytes": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {"reset"}),
            "garbage frame": (encode_frame(b"\xff\xfe\xfd garbage"), {"ERROR_CODE_BAD_REQUEST"}),
            "prefix over cap": (
                encode_uvarint(MAX_FRAME_SIZE + 1) + b"x" * 64,
                {"ERROR_CODE_BAD_REQUEST", "reset"},
            ),
            "huge varint": (b"\xff" * 10, {"ERROR_CODE_BAD_REQUEST", "reset"}),
            "wrong message": (
                encode_frame(announce.encode_offer(offer)),
                {"ERROR_CODE_BAD_REQUEST"},
            ),
            "response as request": (
                encode_frame(
                    pb.TaskResponse(
                        grant=pb.ClaimGrant(task_id="free", lease_id="x", lease_expires_at_ms=5)
                    ).SerializeToString()
                ),
                {"ERROR_CODE_BAD_REQUEST"},
            ),
            "empty request": (frame(pb.TaskRequest()), {"ERROR_CODE_BAD_REQUEST"}),
            "claim unknown id": (
                frame(pb.TaskRequest(claim=pb.ClaimRequest(task_id="nope"))),
                {"ERROR_CODE_NOT_FOUND"},
            ),
            "claim held task": (
                frame(pb.TaskRequest(claim=pb.ClaimRequest(task_id="held"))),
                {"ERROR_CODE_ALREADY_CLAIMED"},
            ),
            "complete, wrong lease id": (
                frame(
                    pb.TaskRequest(
                        complete=pb.CompleteRequest(task_id="held", lease_id="bogus", result=b"1")
                    )
                ),
                {"ERROR_CODE_NOT_LEASE_HOLDER"},
            ),
            "complete, right lease id, wrong peer": (
                frame(
                    pb.TaskRequest(
                        complete=pb.CompleteRequest(
                            task_id="held", lease_id=grant.lease_id, result=b"1"
                        )
                    )
                ),
                {"ERROR_CODE_NOT_LEASE_HOLDER"},
            ),
            "heartbeat, stolen lease id": (
                frame(
                    pb.TaskRequest(
                        heartbeat=pb.HeartbeatRequest(task_id="held", lease_id=grant.lease_id)
                    )
                ),
                {"ERROR_CODE_NOT_LEASE_HOLDER"},
            ),
            "fail, stolen lease id": (
                frame(
                    pb.TaskRequest(
                        fail=pb.FailRequest(task_id="held", lease_id=grant.lease_id, error="x")
                    )
                ),
                {"ERROR_CODE_NOT_LEASE_HOLDER"},
            ),
            "complete, result not JSON": (
                frame(
                    pb.TaskRequest(
                        complete=pb.CompleteRequest(task_id="free", lease_id="l", result=b"{x")
                    )
                ),
                {"ERROR_CODE_BAD_REQUEST"},
            ),
            "status of unknown id": (
                frame(pb.TaskRequest(status=pb.StatusRequest(task_id="nope"))),
                {"ERROR_CODE_NOT_FOUND"},
            ),
        }
        for name, (data, expected) in cases.items():
            got = code_of(await exchange(attacker, owner, data))
            assert got in expected, f"{name}: got {got}, expected {expected}"
            assert await snapshot(owner) == before, f"{name} changed the owner's state"
            # ...and the owner keeps serving valid requests.
            st = await attacker.client.status(owner.host.get_id(), "free")
            assert st.state == pb.TASK_STATE_PENDING

        # The real holder is unaffected by all of it.
        ack = await holder.client.complete(owner.host.get_id(), "held", grant.lease_id, b"{}")
        assert ack.state == pb.TASK_STATE_COMPLETED
        assert owner.server.rejected >= 4


async def test_allow_list_refuses_streams_and_gossip(tmp_path: Path) -> None:
    async with start_nodes(tmp_path, [[], [0]]) as (friend, stranger):
        allowed = {"allowed_peers": [friend.peer_id]}
        async with start_nodes(tmp_path / "closed", [[]], extra={0: allowed}) as (owner,):
            await friend.connect(owner.listen_addrs()[0])
            await stranger.connect(owner.listen_addrs()[0])
            await owner.submit_task(task_id="t", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
            await stranger.submit_task(task_id="s", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
            await friend.submit_task(task_id="f", task_type="t", data={}, tags=["P2P_ELIGIBLE"])
            # The friend's gossip is heard, the stranger's is not.
            await wait_for(lambda: "f" in owner.offers, what="friend's offer at the owner")
            await wait_for(lambda: "t" in friend.offers, what="owner's offer at the friend")
            before = await trio.to_thread.run_sync(owner.tasks.status, "t")
            for req in (
                pb.TaskRequest(claim=pb.ClaimRequest(task_id="t")),
                pb.TaskRequest(status=pb.StatusRequest(task_id="t")),
                pb.TaskRequest(list=pb.ListRequest()),
            ):
                got = await exchange(stranger, owner, encode_frame(req.SerializeToString()))
                assert code_of(got) in {"ERROR_CODE_DENIED", "reset"}
            try:
                await stranger.client.claim(owner.host.get_id(), "t", [])
                raise AssertionError("a stranger's claim was granted")
            except ErrorResponse as exc:
                assert exc.code == pb.ERROR_CODE_DENIED
            assert await trio.to_thread.run_sync(owner.tasks.status, "t") == before
            assert "s" not in owner.offers
            assert stranger.peer_id not in owner.mesh_peers()
            task = await friend.get_next_task("w", [])
            assert task is not None and task["task_id"] in {"t", "f"}
