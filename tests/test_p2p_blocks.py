"""Block exchange (/dsi/block/1.0.0) between real libp2p hosts on 127.0.0.1, and the owner's
provenance record of a remote worker's completion.

No Kubo here: every node's ``ipfs_api`` points at a closed port, so a CID that is not local
can only come from a peer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from ipfs_accelerate_py.datasets_integration import FilesystemHandler
from node.errors import BlockNotFoundError
from node.p2p import Node
from node.p2p.blocks import LocalBlockSource
from node.p2p.portal import P2PHandle
from node.services import acquire_services, release_services
from node.storage import LocalBlockStore, format_cid
from protocols import block as block_protocol
from protocols.codec import parse_strict
from protocols.errors import ErrorResponse
from protocols.framing import read_frame, write_frame
from protocols.pb import block_pb2 as bpb
from protocols.pb import task_pb2 as pb
from tests.p2p_helpers import FAST, LOOPBACK, node_config, start_nodes, wait_for

MIB = 1024 * 1024


def closed_port_api() -> str:
    """A Kubo API address on which nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}"


def no_kubo(n: int, **kw: Any) -> dict[int, dict[str, Any]]:
    api = closed_port_api()
    return {i: {"ipfs_api": api, **kw} for i in range(n)}


def handler(node: Node) -> FilesystemHandler:
    """The public facade over ``node``'s own services (same cache_dir, same process)."""
    cfg = node.config
    return FilesystemHandler(
        {"cache_dir": str(cfg.cache_dir), "enable_p2p": True, "ipfs_api": cfg.ipfs_api}
    )


def make_folder(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.txt").write_bytes(b"hello world\n")
    (root / "sub" / "weights.bin").write_bytes(os.urandom(300_000))  # > 1 chunk
    (root / "sub" / "deeper" / "zero.bin").write_bytes(b"")
    (root / "sub" / "deeper" / "c.json").write_bytes(b'{"x": 1}')
    return root


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def unknown_cid() -> str:
    """A real CID of content no node stores."""
    return format_cid(1, "raw", hashlib.sha256(b"no peer stores this block " * 3).digest())


HELLO = b"hello world\n"
HELLO_V0 = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"  # dag-pb leaf of HELLO
HELLO_RAW = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


def test_server_packs_one_frame_and_defers_the_rest(tmp_path: Path) -> None:
    store = LocalBlockStore(tmp_path / "blocks")
    try:
        cids = [store.put(os.urandom(200_000)) for _ in range(5)]
        source = LocalBlockSource(store, lambda peer: True)
        absent = unknown_cid()
        resp = block_protocol.collect(source, [*cids, absent, "not-a-cid"], budget=450_000)
        assert [b.cid for b in resp.blocks] == cids[:2]
        assert [store.put(b.data) for b in resp.blocks] == cids[:2]
        assert list(resp.deferred) == cids[2:]
        assert list(resp.missing) == [absent, "not-a-cid"]
        # A block bigger than a whole frame can never travel: reported missing, not deferred.
        small = block_protocol.collect(source, cids[:1], budget=100_000)
        assert list(small.missing) == cids[:1] and not small.deferred and not small.blocks
    finally:
        store.close()


def test_client_returns_only_verified_requested_blocks() -> None:
    assert block_protocol.block_matches(HELLO_RAW, HELLO)
    assert not block_protocol.block_matches(HELLO_RAW, HELLO + b"!")
    assert not block_protocol.block_matches(HELLO_V0, HELLO)  # the v0 CID is of a dag-pb node
    assert not block_protocol.block_matches("not-a-cid", HELLO)
    other = unknown_cid()
    resp = bpb.BlockResponse(
        blocks=[
            bpb.Block(cid=HELLO_RAW, data=HELLO),
            bpb.Block(cid=other, data=HELLO),  # wrong bytes
            bpb.Block(cid=unknown_cid() + "x", data=b""),  # never asked for
        ],
        deferred=[HELLO_V0, HELLO_RAW],
    )
    reply = block_protocol.BlockClient._check("peer", [HELLO_RAW, other, HELLO_V0, "q"], resp)
    assert reply.blocks == {HELLO_RAW: HELLO}
    assert reply.rejected == [other]
    assert reply.deferred == [HELLO_V0]
    assert reply.missing == ["q"]  # not mentioned at all: never "ask again"


async def test_file_and_folder_fetched_from_a_peer(tmp_path: Path) -> None:
    big = tmp_path / "model.bin"
    big.write_bytes(os.urandom(5 * MIB + 12_345))  # 21 leaves: more than one frame
    folder = make_folder(tmp_path / "dataset")
    async with start_nodes(tmp_path / "nodes", [[], [0]], extra=no_kubo(2)) as (a, b):
        fs_a, fs_b = handler(a), handler(b)
        try:
            file_cid = await trio.to_thread.run_sync(fs_a.add_file, str(big))
            dir_cid = await trio.to_thread.run_sync(fs_a.add_directory, str(folder))
            assert not file_cid.in_kubo and not dir_cid.in_kubo
            assert not await trio.to_thread.run_sync(fs_b.blocks.has, file_cid)

            with trio.fail_after(60):
                out = await trio.to_thread.run_sync(fs_b.get_file, file_cid, tmp_path / "f")
            assert Path(out).read_bytes() == big.read_bytes()
            # Root first, then all 21 leaves in batches: a handful of requests, not 22.
            assert b.block_fetcher.stats["blocks"] == 22
            assert b.block_fetcher.stats["requests"] < 6
            assert a.block_server.blocks_sent == 22

            with trio.fail_after(60):
                out_dir = await trio.to_thread.run_sync(fs_b.get_file, dir_cid, tmp_path / "d")
            assert tree(Path(out_dir)) == tree(folder)
            listing_a = await trio.to_thread.run_sync(fs_a.list_directory, dir_cid)
            listing_b = await trio.to_thread.run_sync(fs_b.list_directory, dir_cid)
            assert listing_b == listing_a
            # Same CIDs: B, now holding the bytes, computes exactly A's CIDs for them.
            again = await trio.to_thread.run_sync(fs_b.add_file, out)
            assert again == file_cid
            again_dir = await trio.to_thread.run_sync(fs_b.add_directory, out_dir)
            assert again_dir == dir_cid
            # The blocks are B's own now: readable with A gone from the picture.
            assert await trio.to_thread.run_sync(fs_b.cat, listing_b[0]["cid"]) == (
                b"hello world\n"
            )

            # A CID nobody has: BlockNotFoundError after the peers said "missing".
            with trio.fail_after(30), pytest.raises(BlockNotFoundError, match="no connected peer"):
                await trio.to_thread.run_sync(fs_b.get_file, unknown_cid(), tmp_path / "u")
            with trio.fail_after(30), pytest.raises(BlockNotFoundError):
                await trio.to_thread.run_sync(fs_b.blocks.get_block, unknown_cid())
        finally:
            fs_a.close()
            fs_b.close()


def corrupting_handler(served: list[str]) -> Any:
    """A misbehaving peer: speaks /dsi/block/1.0.0 correctly but answers every CID with bytes
    that do not hash to it."""

    async def handle(stream: Any) -> None:
        try:
            with trio.fail_after(10):
                req = parse_strict(bpb.BlockRequest, await read_frame(stream))
                resp = bpb.BlockResponse(
                    blocks=[bpb.Block(cid=c, data=os.urandom(1024)) for c in req.cids]
                )
                served.extend(req.cids)
                await write_frame(stream, resp.SerializeToString())
                await stream.close()
        except Exception:
            with trio.move_on_after(1):
                await stream.reset()

    return handle


async def test_corrupt_peer_is_rejected_and_others_are_tried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(600_000)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    # 0 = honest holder, 1 = corrupting peer, 2 = connected to both, 3 = only to the liar.
    links = [[], [], [0, 1], [1]]
    async with start_nodes(tmp_path / "nodes", links, extra=no_kubo(4)) as (good, evil, b, d):
        served: list[str] = []
        evil.host.set_stream_handler(block_protocol.PROTOCOL_ID, corrupting_handler(served))
        fs_good, fs_b, fs_d = handler(good), handler(b), handler(d)
        try:
            cid = await trio.to_thread.run_sync(fs_good.add_file, str(src))
            caplog.set_level(logging.ERROR, logger="dsi")

            # The liar is asked first: its bytes are rejected, the honest peer supplies them.
            got = await b.fetch_blocks([cid], peers=[evil.peer_id, good.peer_id])
            assert hashlib.sha256(got[cid]).digest() == hashlib.sha256(
                await trio.to_thread.run_sync(fs_good.blocks.get_block, cid)
            ).digest()
            assert served == [cid]
            assert b.block_fetcher.stats["rejected"] == 1
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert any(cid in m and evil.peer_id in m for m in errors), errors

            # Through the facade: the liar is now skipped, the file arrives intact.
            with trio.fail_after(60):
                out = await trio.to_thread.run_sync(fs_b.get_file, cid, tmp_path / "b.bin")
            assert Path(out).read_bytes() == data

            # A node whose only peer lies gets nothing, and stores none of the bad bytes.
            with trio.fail_after(30), pytest.raises(BlockNotFoundError):
                await trio.to_thread.run_sync(fs_d.get_file, cid, tmp_path / "d.bin")
            assert d.block_fetcher.stats["rejected"] >= 1
            assert not await trio.to_thread.run_sync(fs_d.blocks.has, cid)
            assert not (tmp_path / "d.bin").exists()
        finally:
            for fs in (fs_good, fs_b, fs_d):
                fs.close()


async def test_block_requests_honour_the_allow_list(tmp_path: Path) -> None:
    async with start_nodes(tmp_path, [[], [0]], extra=no_kubo(2)) as (friend, stranger):
        allowed = {"allowed_peers": [friend.peer_id], **no_kubo(1)[0]}
        async with start_nodes(tmp_path / "closed", [[]], extra={0: allowed}) as (owner,):
            await friend.connect(owner.listen_addrs()[0])
            await stranger.connect(owner.listen_addrs()[0])
            fs_owner = handler(owner)
            try:
                cid = await trio.to_thread.run_sync(
                    lambda: fs_owner.blocks.add_bytes(b"for friends only\n")
                )
                block = await trio.to_thread.run_sync(fs_owner.blocks.get_block, cid)
            finally:
                fs_owner.close()
            owner_id = owner.host.get_id()
            with pytest.raises(ErrorResponse) as refused:
                await stranger.block_client.request(owner_id, [cid])
            assert refused.value.code == pb.ERROR_CODE_DENIED
            assert await stranger.fetch_blocks([cid], peers=[owner.peer_id]) == {}
            assert owner.block_server.rejected >= 2 and owner.block_server.blocks_sent == 0
            got = await friend.fetch_blocks([cid], peers=[owner.peer_id])
            assert got == {cid: block} and b"for friends only" in block


async def test_owner_records_remote_worker_execution(tmp_path: Path) -> None:
    """The owner writes a worker_execution record for a remote completion and a remote
    failure (worker = the authenticated peer id); a failing provenance store never fails the
    completion itself."""
    input_cid = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    result_cid = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    extra = {0: {"enable_provenance": True, **no_kubo(1)[0]}}
    async with start_nodes(tmp_path, [[], [0]], extra=extra) as (owner, worker):
        for tid in ("ok", "bad", "late"):
            await owner.submit_task(
                task_id=tid, task_type="inference", data={"input_cid": input_cid},
                tags=["P2P_ELIGIBLE"], max_attempts=1,
            )
        prov = owner.services.provenance

        def records(task_id: str) -> list[dict[str, Any]]:
            return prov.query({"type": "worker_execution", "task_id": task_id})

        async def claim(task_id: str) -> pb.ClaimGrant:
            return await worker.client.claim(owner.host.get_id(), task_id, [])

        grant = await claim("ok")
        ack = await worker.client.complete(
            owner.host.get_id(), "ok", grant.lease_id, b'{"status":"success"}', result_cid
        )
        assert ack.state == pb.TASK_STATE_COMPLETED
        recs = await wait_for(lambda: records("ok"), what="owner's record of the completion")
        (rec,) = recs
        assert rec["worker_id"] == worker.peer_id and rec["node"] == owner.peer_id
        assert rec["output_cid"] == result_cid and rec["input_cid"] == input_cid
        assert rec["data"]["status"] == "completed" and rec["data"]["owner"] == owner.peer_id
        assert rec["data"]["result"] == {"status": "success"}
        # The worker repeats its complete (as when the first Ack was lost): acknowledged
        # again, recorded once.
        again = await worker.client.complete(
            owner.host.get_id(), "ok", grant.lease_id, b'{"status":"success"}', result_cid
        )
        assert again.state == pb.TASK_STATE_COMPLETED
        assert owner.stats["provenance_repeats"] == 1 and len(records("ok")) == 1

        grant = await claim("bad")
        ack = await worker.client.fail(owner.host.get_id(), "bad", grant.lease_id, "OOM", False)
        assert ack.state == pb.TASK_STATE_FAILED
        (rec,) = await wait_for(lambda: records("bad"), what="owner's record of the failure")
        assert rec["worker_id"] == worker.peer_id
        assert rec["data"]["status"] == "failed" and rec["data"]["error"] == "OOM"

        # The provenance store breaks (closed): the completion still succeeds.
        await trio.to_thread.run_sync(prov.close)
        grant = await claim("late")
        ack = await worker.client.complete(owner.host.get_id(), "late", grant.lease_id, b"{}")
        assert ack.state == pb.TASK_STATE_COMPLETED
        await wait_for(lambda: owner.stats["provenance_failures"] == 1, what="failure counted")
        status = await owner.get_task_status("late")
        assert status["status"] == "completed" and status["worker_id"] == worker.peer_id
        assert owner.stats["provenance_records"] == 2


def test_filesystem_handler_with_p2p_asks_its_bootstrap_peer(tmp_path: Path) -> None:
    """The seed's sync API: ``FilesystemHandler(enable_p2p=True, bootstrap_peers=...)`` starts
    its node on the first miss and gets the file from the peer."""
    data = os.urandom(700_000)
    src = tmp_path / "model.bin"
    src.write_bytes(data)
    api = closed_port_api()
    owner_services = acquire_services(node_config(tmp_path / "a", ipfs_api=api))
    owner = P2PHandle.start(owner_services, FAST)
    try:
        with FilesystemHandler(
            {"cache_dir": str(tmp_path / "a"), "enable_p2p": True, "ipfs_api": api}
        ) as fs_a:
            cid = fs_a.add_file(str(src))
        cfg = {
            "cache_dir": str(tmp_path / "b"),
            "enable_p2p": True,
            "ipfs_api": api,
            "listen_addrs": [LOOPBACK],
            "bootstrap_peers": [owner.listen_addrs()[0]],
        }
        with FilesystemHandler(cfg) as fs_b:
            assert not fs_b.services.p2p_running
            out = fs_b.get_file(cid, str(tmp_path / "out.bin"))
            assert Path(out).read_bytes() == data
            assert fs_b.services.p2p_running
            assert fs_b.list_pins() == []  # fetched blocks are a cache, not a pin
            assert fs_b.blocks.has(cid)
    finally:
        owner.stop()
        release_services(owner_services)
