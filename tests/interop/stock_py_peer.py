"""A dsi peer written the way another team would write one with stock py-libp2p 0.8.1.

It imports nothing from this project's ``node`` or ``protocols`` packages, so none of dsi's
py-libp2p workarounds (``node/p2p/_libp2p_fixes.py``) are installed in this process: it runs
the library exactly as published, with the library's own stream negotiation, yamux, Noise,
gossipsub and varint readers. The only thing it shares with dsi is the wire contract: the
messages come from ``protocols/pb/task_pb2.py``, the code protoc generates from
``proto/dsi/v1/task.proto``, loaded by file path.

    python tests/interop/stock_py_peer.py worker --connect MULTIADDR --task-id ID [...]
    python tests/interop/stock_py_peer.py owner --task-id ID --data JSON [...]

It prints one JSON object per line (``ready`` first, ``error`` on failure) and exits by itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils import encode_varint_prefixed, read_varint_prefixed_bytes

_PB_FILE = Path(__file__).resolve().parents[2] / "protocols" / "pb" / "task_pb2.py"
_spec = importlib.util.spec_from_file_location("dsi_v1_task_pb2", _PB_FILE)
assert _spec is not None and _spec.loader is not None
pb: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pb)

TASK_PROTOCOL = TProtocol("/dsi/task/1.0.0")
TOPIC = "dsi/tasks/v1"
STEP_TIMEOUT = 10.0  # every network wait of this peer is bounded


def dsi_modules() -> list[str]:
    """Modules of dsi loaded in this process: must stay empty (nothing of dsi is patched in)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in ("node", "protocols"))


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@asynccontextmanager
async def running() -> AsyncIterator[tuple[Any, Pubsub]]:
    """A started host on a free loopback port with gossipsub ready; stopped on exit."""
    host, pubsub, gossipsub = build()
    async with (
        host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        background_trio_service(pubsub),
        background_trio_service(gossipsub),
    ):
        await pubsub.wait_until_ready()
        yield host, pubsub


def build() -> tuple[Any, Pubsub, GossipSub]:
    key_pair = create_new_key_pair()
    host = new_host(
        key_pair=key_pair,
        sec_opt={
            TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
                key_pair, noise_privkey=create_x25519_key_pair().private_key
            )
        },
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    gossipsub = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
    )
    return host, Pubsub(host, gossipsub, strict_signing=True), gossipsub


def full_addrs(host: Any) -> list[str]:
    peer = host.get_id().to_base58()
    out = []
    for addr in host.get_addrs():
        text = str(addr)
        out.append(text if "/p2p/" in text else f"{text}/p2p/{peer}")
    return out


async def request(host: Any, peer: ID, req: Any) -> Any:
    """One request/response stream, the plain py-libp2p way: negotiate, write, read, close."""
    with trio.fail_after(STEP_TIMEOUT):
        stream = await host.new_stream(peer, [TASK_PROTOCOL])
        try:
            await stream.write(encode_varint_prefixed(req.SerializeToString()))
            raw = await read_varint_prefixed_bytes(stream)
        finally:
            await stream.close()
    resp = pb.TaskResponse()
    resp.ParseFromString(raw)
    return resp


def describe(resp: Any) -> dict[str, Any]:
    body = resp.WhichOneof("body")
    if body == "error":
        return {"body": "error", "code": pb.ErrorCode.Name(resp.error.code),
                "message": resp.error.message}
    if body == "ack":
        return {"body": "ack", "task_id": resp.ack.task_id,
                "state": pb.TaskState.Name(resp.ack.state)}
    return {"body": body}


# ---------------------------------------------------------------------------- worker
async def run_worker(args: argparse.Namespace) -> None:
    async with running() as (host, pubsub):
        emit("ready", peer_id=host.get_id().to_base58(), addrs=full_addrs(host),
             dsi_modules=dsi_modules())
        sub = await pubsub.subscribe(TOPIC)
        info = info_from_p2p_addr(multiaddr.Multiaddr(args.connect))
        with trio.fail_after(STEP_TIMEOUT):
            await host.connect(info)
        owner = info.peer_id
        emit("connected", peer_id=owner.to_base58())

        # Gossip: the owner's signed announcement of the task.
        with trio.fail_after(args.wait_gossip):
            while True:
                msg = await sub.get()
                ann = pb.Announcement()
                ann.ParseFromString(msg.data)
                if ann.WhichOneof("body") == "offer" and ann.offer.task_id == args.task_id:
                    break
        origin = ID(msg.from_id).to_base58()
        emit("offer", task_id=ann.offer.task_id, origin=origin,
             owner_peer_id=ann.offer.owner_peer_id, signed=bool(msg.signature),
             owner_addrs=list(ann.offer.owner_addrs), task_type=ann.offer.task_type,
             priority=ann.offer.priority, tags=sorted(ann.offer.tags),
             attempt=ann.offer.attempt)

        listed = await request(host, owner, pb.TaskRequest(list=pb.ListRequest(
            capabilities=args.capabilities)))
        emit("list", offers=[o.task_id for o in listed.list.offers])

        claim = pb.TaskRequest(claim=pb.ClaimRequest(task_id=args.task_id,
                                                     capabilities=args.capabilities))
        granted = await request(host, owner, claim)
        if granted.WhichOneof("body") != "grant":
            emit("error", where="claim", response=describe(granted))
            return
        grant = granted.grant
        emit("granted", task_id=grant.task_id, lease_id=grant.lease_id,
             task_type=grant.task_type, data=json.loads(grant.data or b"null"),
             attempt=grant.attempt, lease_expires_at_ms=grant.lease_expires_at_ms)
        again = await request(host, owner, claim)
        emit("claim_again", response=describe(again))

        beat = await request(host, owner, pb.TaskRequest(heartbeat=pb.HeartbeatRequest(
            task_id=args.task_id, lease_id=grant.lease_id)))
        emit("heartbeat", response=describe(beat))

        result = args.result.encode()
        wrong = await request(host, owner, pb.TaskRequest(complete=pb.CompleteRequest(
            task_id=args.task_id, lease_id="0" * 32, result=result)))
        emit("complete_wrong_lease", response=describe(wrong))

        done = await request(host, owner, pb.TaskRequest(complete=pb.CompleteRequest(
            task_id=args.task_id, lease_id=grant.lease_id, result=result)))
        emit("completed", response=describe(done))

        status = await request(host, owner, pb.TaskRequest(status=pb.StatusRequest(
            task_id=args.task_id)))
        st = status.status
        emit("status", state=pb.TaskState.Name(st.state), worker_peer_id=st.worker_peer_id,
             attempt=st.attempt, result=json.loads(st.result or b"null"))

        missing = await request(host, owner, pb.TaskRequest(status=pb.StatusRequest(
            task_id="no-such-task")))
        emit("status_unknown", response=describe(missing))
        emit("done")


# ---------------------------------------------------------------------------- owner
class Owner:
    """One task, served the way the wire contract says: the stream's peer is the worker."""

    def __init__(self, args: argparse.Namespace, peer_id: str, addrs: list[str]) -> None:
        self.args = args
        self.peer_id = peer_id
        self.addrs = addrs
        self.state = pb.TASK_STATE_PENDING
        self.holder: str | None = None
        self.lease_id = ""
        self.lease_expires = 0.0
        self.result = b""
        self.finished = trio.Event()

    def offer(self) -> Any:
        return pb.TaskOffer(
            task_id=self.args.task_id, task_type=self.args.task_type,
            priority=self.args.priority, tags=["P2P_ELIGIBLE"], owner_peer_id=self.peer_id,
            owner_addrs=self.addrs, submitted_at_ms=int(time.time() * 1000), attempt=1,
        )

    def _error(self, code: int, message: str) -> Any:
        return pb.TaskResponse(error=pb.Error(code=code, message=message))

    def _check_holder(self, worker: str, task_id: str, lease_id: str, op: str) -> Any | None:
        if task_id != self.args.task_id:
            return self._error(pb.ERROR_CODE_NOT_FOUND, f"no task {task_id!r}")
        if worker != self.holder or lease_id != self.lease_id:
            emit("rejected", op=op, by=worker, lease_id=lease_id)
            return self._error(pb.ERROR_CODE_NOT_LEASE_HOLDER, "not the lease holder")
        if self.state != pb.TASK_STATE_CLAIMED:
            return self._error(pb.ERROR_CODE_ALREADY_CLAIMED, "task is not claimed")
        return None

    def answer(self, worker: str, req: Any) -> Any:
        body = req.WhichOneof("body")
        emit("request", op=body, by=worker)
        if body == "list":
            open_ = self.state == pb.TASK_STATE_PENDING
            return pb.TaskResponse(list=pb.TaskList(offers=[self.offer()] if open_ else []))
        if body == "claim":
            if req.claim.task_id != self.args.task_id:
                return self._error(pb.ERROR_CODE_NOT_FOUND, "no such task")
            if self.state != pb.TASK_STATE_PENDING:
                emit("claim", by=worker, granted=False)
                return self._error(pb.ERROR_CODE_ALREADY_CLAIMED, "already claimed")
            self.state, self.holder = pb.TASK_STATE_CLAIMED, worker
            self.lease_id = f"{time.time_ns():032x}"[-32:]
            self.lease_expires = time.time() + self.args.lease_seconds
            emit("claim", by=worker, granted=True, lease_id=self.lease_id)
            return pb.TaskResponse(grant=pb.ClaimGrant(
                task_id=self.args.task_id, lease_id=self.lease_id,
                lease_expires_at_ms=int(self.lease_expires * 1000),
                task_type=self.args.task_type, data=self.args.data.encode(), attempt=1,
            ))
        if body == "heartbeat":
            hb = req.heartbeat
            refused = self._check_holder(worker, hb.task_id, hb.lease_id, "heartbeat")
            if refused is not None:
                return refused
            self.lease_expires = time.time() + self.args.lease_seconds
            emit("heartbeat", by=worker, lease_id=hb.lease_id)
            return pb.TaskResponse(ack=pb.Ack(task_id=hb.task_id, state=self.state))
        if body == "complete":
            c = req.complete
            refused = self._check_holder(worker, c.task_id, c.lease_id, "complete")
            if refused is not None:
                return refused
            self.state, self.result = pb.TASK_STATE_COMPLETED, c.result
            emit("completed", by=worker, lease_id=c.lease_id,
                 result=json.loads(c.result or b"null"))
            self.finished.set()
            return pb.TaskResponse(ack=pb.Ack(task_id=c.task_id, state=self.state))
        if body == "status":
            if req.status.task_id != self.args.task_id:
                return self._error(pb.ERROR_CODE_NOT_FOUND, "no such task")
            return pb.TaskResponse(status=pb.TaskStatus(
                task_id=self.args.task_id, state=self.state, worker_peer_id=self.holder or "",
                attempt=1, result=self.result,
            ))
        return self._error(pb.ERROR_CODE_BAD_REQUEST, f"unsupported request {body!r}")

    async def handle(self, stream: Any) -> None:
        worker = stream.muxed_conn.peer_id.to_base58()
        try:
            with trio.fail_after(STEP_TIMEOUT):
                raw = await read_varint_prefixed_bytes(stream)
                req = pb.TaskRequest()
                req.ParseFromString(raw)
                resp = self.answer(worker, req)
                await stream.write(encode_varint_prefixed(resp.SerializeToString()))
                await stream.close()
        except Exception as exc:  # a peer's broken stream must not stop the owner
            emit("stream_error", by=worker, error=f"{type(exc).__name__}: {exc}")
            await stream.reset()


async def run_owner(args: argparse.Namespace) -> None:
    async with running() as (host, pubsub):
        owner = Owner(args, host.get_id().to_base58(), full_addrs(host))
        host.set_stream_handler(TASK_PROTOCOL, owner.handle)
        await pubsub.subscribe(TOPIC)  # join the topic's mesh so publishes reach the workers
        emit("ready", peer_id=owner.peer_id, addrs=owner.addrs, dsi_modules=dsi_modules())
        async with trio.open_nursery() as nursery:

            async def announce() -> None:
                while owner.state == pb.TASK_STATE_PENDING:
                    ann = pb.Announcement(offer=owner.offer())
                    await pubsub.publish(TOPIC, ann.SerializeToString())
                    await trio.sleep(1.0)

            nursery.start_soon(announce)
            await owner.finished.wait()
            await trio.sleep(args.linger)  # answer the worker's status request, then stop
            nursery.cancel_scope.cancel()
        emit("done")


def main() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("role", choices=["worker", "owner"])
    ap.add_argument("--task-id", required=True)
    ap.add_argument("--timeout", type=float, default=60.0, help="the whole run")
    ap.add_argument("--connect", help="worker: the owner's multiaddr with /p2p/<id>")
    ap.add_argument("--capabilities", type=lambda s: [c for c in s.split(",") if c],
                    default=[])
    ap.add_argument("--result", default='{"ok": true}')
    ap.add_argument("--wait-gossip", type=float, default=20.0)
    ap.add_argument("--task-type", default="inference")
    ap.add_argument("--data", default="{}")
    ap.add_argument("--priority", type=int, default=5)
    ap.add_argument("--lease-seconds", type=float, default=30.0)
    ap.add_argument("--linger", type=float, default=3.0)
    args = ap.parse_args()
    run = run_worker if args.role == "worker" else run_owner

    async def bounded() -> None:
        with trio.fail_after(args.timeout):
            await run(args)

    try:
        trio.run(bounded)
    except BaseException as exc:  # report, then exit non-zero: the test reads the events
        emit("error", error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
