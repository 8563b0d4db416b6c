"""The trio P2P node: one libp2p host, the task gossip, the ``/dsi/task/1.0.0`` protocol and
the ``/dsi/block/1.0.0`` block exchange.

Owner side: tasks submitted here with the ``P2P_ELIGIBLE`` tag are offered on gossip (on
submit, when a retry becomes claimable, and periodically while unclaimed) and handed out only
through the stream protocol, where the local ``TaskQueue`` decides: the owner alone arbitrates
claims, and the worker's identity is the stream's authenticated peer id.

Worker side: ``get_next_task`` weighs the local queue against the remote offers heard on gossip
(or listed from owners), claims the best one from its owner, and keeps the lease alive in the
background until ``complete_task`` / ``fail_task`` report back to the owner.

Blocks: the node serves its local blocks to allowed peers and, while it runs, installs a peer
fetcher on its services, so a ``BlockService`` read that misses locally and in Kubo asks the
connected peers (every block verified against its CID before it is stored).

Every service call (SQLite) runs in a worker thread (``trio.to_thread``); every network step has
a timeout.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import sys
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p.abc import INetConn, INetStream, INotifee
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from node._bounded import BoundedDict
from node.config import NodeConfig, build_config
from node.errors import (
    ConfigError,
    DatasetsError,
    InvalidArgumentError,
    LeaseError,
    NodeRunningError,
    PeerError,
)
from node.p2p._errors import from_error_response, to_error_response
from node.p2p._host import HostParts, build_host, stop_auto_connector
from node.p2p._libp2p_fixes import NOOP_STREAM_CALLBACKS
from node.p2p.blocks import LocalBlockSource, PeerBlockFetcher
from node.p2p.offers import OfferTable, RemoteOffer, rank_key
from node.p2p.settings import P2PSettings
from node.services import NodeServices, acquire_services, release_services
from node.tasks import (
    TAG_GPU_PREFERRED,
    TAG_P2P_ELIGIBLE,
    QueueBusy,
    is_gpu_worker,
    norm_capabilities,
)
from protocols import announce
from protocols import block as block_protocol
from protocols.codec import decode_json, encode_json
from protocols.errors import ErrorResponse, ProtocolError
from protocols.framing import MAX_FRAME_SIZE
from protocols.pb import task_pb2 as pb
from protocols.task import PROTOCOL_ID, TaskClient, TaskServer

if sys.version_info < (3, 11):  # pragma: no cover - libp2p brings the backport there
    from exceptiongroup import BaseExceptionGroup

log = logging.getLogger("dsi.p2p")
T = TypeVar("T")

STATE_TO_PB = {
    "pending": pb.TASK_STATE_PENDING,
    "claimed": pb.TASK_STATE_CLAIMED,
    "completed": pb.TASK_STATE_COMPLETED,
    "failed": pb.TASK_STATE_FAILED,
    "cancelled": pb.TASK_STATE_CANCELLED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}
_EVENT_UPDATES = {"claimed", "completed", "failed", "cancelled"}
# Leave room in gossipsub's 32-RPC per-peer queue (a publish takes 2) for control traffic.
_PUBLISH_QUEUE_HIGH_WATER = 8
_MAX_ANNOUNCE_BACKLOG = 100_000
_MAX_REMEMBERED_REMOTE = 10_000
_MAX_PEERS_REMEMBERED = 4096


def _cid_or_none(value: Any) -> str | None:
    """``value`` if it is a valid CID string, else None (results may carry placeholders)."""
    if not isinstance(value, str):
        return None
    from node.storage import is_cid

    return value if is_cid(value) else None


def _has_tag(tags: Iterable[str], tag: str) -> bool:
    t = tag.casefold()
    return any(x.casefold() == t for x in tags)


@functools.lru_cache(maxsize=4096)
def _peer_id(value: str) -> ID:
    """``ID.from_base58``, decoded once per peer: workers name an owner on every call."""
    return ID.from_base58(value)


@functools.lru_cache(maxsize=4096)
def _looks_like_peer_id(value: str | None) -> bool:
    if not value or len(value) < 40:
        return False
    try:
        _peer_id(value)
    except Exception:
        return False
    return True


def _strip_p2p(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    return addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{value}")) if value else addr


@dataclass
class HeldLease:
    """A remote task this node holds for one of its workers."""

    task_id: str
    owner: str
    lease_id: str
    worker_id: str
    lease_seconds: float
    expires_at: float
    attempt: int
    owner_addrs: tuple[str, ...] = ()
    scope: trio.CancelScope | None = None
    lost: str | None = None  # why the lease ended while we still held it


class _Notifee(INotifee):
    """Connection events: wake the bootstrap keepers, shut non-allowed peers out of gossip."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: Any, stream: INetStream) -> None:
        return None

    async def connected(self, network: Any, conn: INetConn) -> None:
        self.node._on_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        self.node._on_disconnected()

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


# Stream events do nothing here: the host skips their fan-out (node.p2p._libp2p_fixes).
NOOP_STREAM_CALLBACKS.update({_Notifee.opened_stream, _Notifee.closed_stream})


class OwnerAuthority:
    """``protocols.task.TaskAuthority`` over the local TaskQueue (the owner side)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def is_allowed(self, peer_id: str) -> bool:
        return self.node.is_allowed(peer_id)

    async def _call(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self.node.queue_call(fn, *args)
        except DatasetsError as exc:
            raise to_error_response(exc, op) from None

    async def claim(self, worker: str, req: pb.ClaimRequest) -> pb.ClaimGrant:
        tasks = self.node.tasks
        grant = await self._call(
            "claim",
            lambda: tasks.claim(req.task_id, worker, list(req.capabilities), p2p_only=True),
        )
        self.node.stats["served_claims"] += 1
        return pb.ClaimGrant(
            task_id=grant["task_id"],
            lease_id=grant["lease_id"],
            lease_expires_at_ms=int(grant["lease_expires_at"] * 1000),
            task_type=grant["task_type"],
            data=encode_json(grant["data"]),
            attempt=grant["attempt"],
        )

    async def _p2p_task(self, task_id: str) -> dict[str, Any]:
        st = await self._call("status", self.node.tasks.status, task_id)
        if not _has_tag(st["tags"], TAG_P2P_ELIGIBLE):
            raise ErrorResponse(
                pb.ERROR_CODE_NOT_FOUND, f"task {task_id!r} is not offered to peers"
            )
        return st

    async def complete(self, worker: str, req: pb.CompleteRequest) -> pb.Ack:
        result = decode_json(req.result, "complete.result")
        st = await self._call(
            "complete",
            lambda: self.node.tasks.complete(
                req.task_id, req.lease_id, result, req.result_cid or None, worker_id=worker
            ),
        )
        self.node.stats["served_completes"] += 1
        self.node._record_remote_execution(worker, st, "completed", result=result)
        return pb.Ack(task_id=req.task_id, state=STATE_TO_PB[st["status"]])

    async def heartbeat(self, worker: str, req: pb.HeartbeatRequest) -> pb.Ack:
        await self._call(
            "heartbeat",
            lambda: self.node.tasks.heartbeat(req.task_id, req.lease_id, worker_id=worker),
        )
        return pb.Ack(task_id=req.task_id, state=pb.TASK_STATE_CLAIMED)

    async def fail(self, worker: str, req: pb.FailRequest) -> pb.Ack:
        st = await self._call(
            "fail",
            lambda: self.node.tasks.fail(
                req.task_id, req.lease_id, req.error or "failed", req.retryable, worker_id=worker
            ),
        )
        self.node._record_remote_execution(worker, st, "failed", error=req.error or "failed")
        return pb.Ack(task_id=req.task_id, state=STATE_TO_PB[st["status"]])

    async def status(self, worker: str, req: pb.StatusRequest) -> pb.TaskStatus:
        st = await self._p2p_task(req.task_id)
        worker_id = st["worker_id"] or ""
        return pb.TaskStatus(
            task_id=st["task_id"],
            state=STATE_TO_PB[st["status"]],
            worker_peer_id=worker_id if _looks_like_peer_id(worker_id) else (
                self.node.peer_id if worker_id else ""
            ),
            attempt=st["attempt"],
            result=encode_json(st["result"]),
            result_cid=st["result_cid"] or "",
            error=st["error"] or "",
        )

    async def list_offers(self, worker: str, req: pb.ListRequest) -> pb.TaskList:
        """The open tasks this worker could claim, best first.

        Spread, not reserve: tasks listed to one worker in the last ``list_hint_seconds`` go
        to the end of the list for the others, so workers polling at once get mostly disjoint
        lists and rarely race for one task. Claims stay first come, first served.
        """
        limit = min(req.limit or 100, 1000)
        offers = await self._call(
            "list",
            lambda: self.node.tasks.list_claimable(
                list(req.capabilities), min(limit * 4, 1000), True
            ),
        )
        now = trio.current_time()
        listed = self.node._listed_to
        mine, others = [], []
        for d in offers:
            holder = listed.get(d["task_id"])
            (others if holder and holder[1] > now and holder[0] != worker else mine).append(d)
        chosen = (mine + others)[:limit]
        until = now + self.node.settings.list_hint_seconds
        for d in chosen:
            listed[d["task_id"]] = (worker, until)
        out = []
        for d in chosen:
            offer = self.node._offer_pb(d)
            if offer is not None:
                out.append(offer)
        return pb.TaskList(offers=out)


class Node:
    """A running P2P node; obtain one with ``async with open_node(cfg) as node``."""

    def __init__(self, services: NodeServices, parts: HostParts, settings: P2PSettings) -> None:
        self.services = services
        self.config: NodeConfig = services.config
        self.tasks = services.tasks
        self.settings = settings
        self.host = parts.host
        self.pubsub = parts.pubsub
        self.gossipsub = parts.gossipsub
        self.peer_id: str = self.host.get_id().to_base58()
        self._allowed = frozenset(self.config.allowed_peers)
        self.client = TaskClient(self.host, timeout=settings.request_timeout)
        self.server = TaskServer(OwnerAuthority(self), timeout=settings.request_timeout)
        self.block_client = block_protocol.BlockClient(
            self.host, timeout=settings.request_timeout
        )
        self.block_server = block_protocol.BlockServer(
            LocalBlockSource(services.local_blocks, self.is_allowed),
            timeout=settings.request_timeout,
        )
        self.block_fetcher = PeerBlockFetcher(
            self.block_client,
            self._block_peers,
            settings,
            has_bootstrap=bool(self.config.bootstrap_peers),
        )
        self.offers = OfferTable(settings.max_remote_offers, settings.remote_offer_ttl)
        self.stats: Counter[str] = Counter()
        self._held: dict[str, HeldLease] = {}
        self._remote_owner: BoundedDict[str, str] = BoundedDict(_MAX_REMEMBERED_REMOTE)
        # task id -> (kind: "offer" | "claimed" | "final", payload), oldest first
        self._announce_q: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        self._queued_offers = 0
        # offers that went out
        self._published: BoundedDict[str, None] = BoundedDict(_MAX_ANNOUNCE_BACKLOG)
        self._announce_wake = trio.Event()
        self._events: deque[dict[str, Any]] = deque()
        self._events_wake = trio.Event()
        self._wake_scheduled = False
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False
        self._owner_addrs: list[str] = []
        self._disconnect_wake = trio.Event()
        # Per-peer hints, bounded: peers choose how many distinct ids this node hears of.
        self._dial_locks: BoundedDict[str, trio.Lock] = BoundedDict(_MAX_PEERS_REMEMBERED)
        self._owner_down_until: BoundedDict[str, float] = BoundedDict(_MAX_PEERS_REMEMBERED)
        self._last_list: BoundedDict[str, float] = BoundedDict(_MAX_PEERS_REMEMBERED)
        self._owners_silent: BoundedDict[str, None] = BoundedDict(_MAX_PEERS_REMEMBERED)
        self._recent_caps: tuple[frozenset[str], float] | None = None
        # Owners heard of on gossip (id -> their addrs), so a worker can list their offers
        # even when its table ran dry; bounded, most recent last.
        self._owners: BoundedDict[str, tuple[str, ...]] = BoundedDict(1024)
        self._bootstrap: dict[str, bool] = {a: False for a in self.config.bootstrap_peers}
        self._nursery: trio.Nursery | None = None
        self._offer_listeners: list[Callable[[pb.TaskOffer], None]] = []
        # owner side: when each open task was offered
        self._offered_at: BoundedDict[str, float] = BoundedDict(_MAX_ANNOUNCE_BACKLOG)
        # owner side: task id -> (worker it was last listed to, until when)
        self._listed_to: BoundedDict[str, tuple[str, float]] = BoundedDict(50_000)
        self._list_was_full: BoundedDict[str, bool] = BoundedDict(_MAX_PEERS_REMEMBERED)
        self._local_work_hint = True
        self._local_peeked_at = -math.inf

    # ------------------------------------------------------------------ identity / status
    def is_allowed(self, peer_id: str) -> bool:
        return not self._allowed or peer_id == self.peer_id or peer_id in self._allowed

    def listen_addrs(self) -> list[str]:
        return list(self._owner_addrs)

    def connected_peers(self) -> list[str]:
        return sorted(p.to_base58() for p in self.host.get_connected_peers())

    def mesh_peers(self) -> list[str]:
        return sorted(p.to_base58() for p in self.gossipsub.mesh.get(announce.TOPIC, set()))

    def topic_peers(self) -> list[str]:
        return sorted(p.to_base58() for p in self.pubsub.peer_topics.get(announce.TOPIC, set()))

    async def status(self) -> dict[str, Any]:
        counts = await trio.to_thread.run_sync(self.tasks.counts)
        return {
            "peer_id": self.peer_id,
            "listen_addrs": self.listen_addrs(),
            "connected_peers": self.connected_peers(),
            "mesh_peers": self.mesh_peers(),
            "topic": announce.TOPIC,
            "protocol": PROTOCOL_ID,
            "task_counts": counts,
            "remote_offers": len(self.offers),
            "held_remote_leases": len(self._held),
            "announce_backlog": len(self._announce_q),
            "bootstrap_peers": [
                {"addr": a, "connected": self._bootstrap.get(a, False)}
                for a in self.config.bootstrap_peers
            ],
            "allow_list": sorted(self._allowed),
            "stats": dict(self.stats),
            "blocks": {
                "protocol": block_protocol.PROTOCOL_ID,
                "served_requests": self.block_server.served,
                "blocks_sent": self.block_server.blocks_sent,
                "refused_requests": self.block_server.rejected,
                **{f"fetch_{k}": v for k, v in self.block_fetcher.stats.items()},
            },
        }

    def remote_offers(self) -> list[dict[str, object]]:
        return self.offers.snapshot()

    def add_offer_listener(self, callback: Callable[[pb.TaskOffer], None]) -> None:
        """``callback(offer)`` (in the trio thread) for each new offer heard on gossip."""
        self._offer_listeners.append(callback)

    def _is_connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().connections.get(peer))

    # ------------------------------------------------------------------ blocks
    def _block_peers(self) -> list[ID]:
        me = self.host.get_id()
        return [
            p
            for p in self.host.get_connected_peers()
            if p != me and self.is_allowed(p.to_base58())
        ]

    async def fetch_blocks(
        self, cids: Sequence[str], peers: Iterable[str] | None = None
    ) -> dict[str, bytes]:
        """Verified blocks from connected peers (or from ``peers``, in that order), keyed by
        the CID strings as given; whatever no peer has is simply absent."""
        ids = (
            [ID.from_base58(p) for p in peers if p != self.peer_id and self.is_allowed(p)]
            if peers is not None
            else None
        )
        return await self.block_fetcher.fetch(cids, ids)

    def fetch_blocks_sync(self, cids: Sequence[str]) -> dict[str, bytes] | None:
        """The peer hook of ``BlockService`` (call it from any thread but the node's own):
        verified blocks from peers, or None when the node is not running."""
        if self._closed:
            return None
        try:
            return trio.from_thread.run(
                self.block_fetcher.fetch, list(cids), trio_token=self._token
            )
        except (trio.RunFinishedError, trio.Cancelled):
            return None

    # ------------------------------------------------------------------ provenance (owner)
    def _record_remote_execution(
        self,
        worker: str,
        st: dict[str, Any],
        outcome: str,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        """Owner side: a ``worker_execution`` record for a remote worker's completion or
        failure (worker = the stream's authenticated peer id). Written after the answer, in
        the background: the task's state is already committed, and a slow or failing
        provenance store must neither delay nor fail the worker's request.

        A worker that repeats its complete (its first answer was lost on the way back) gets
        the same Ack again; the queue marks that status ``repeated`` and nothing is recorded."""
        if not self.config.enable_provenance or self._nursery is None or self._closed:
            return
        if st.get("repeated"):
            self.stats["provenance_repeats"] += 1
            return
        data: dict[str, Any] = {
            "status": outcome,
            "task_type": st.get("task_type"),
            "attempt": st.get("attempt"),
            "task_status": st.get("status"),
            "owner": self.peer_id,
        }
        claimed, finished = st.get("claimed_at"), st.get("completed_at")
        if isinstance(claimed, (int, float)) and isinstance(finished, (int, float)):
            data["duration_ms"] = round((finished - claimed) * 1000, 3)
        if result is not None:
            data["result"] = result
        if error is not None:
            data["error"] = error
        task_data = st.get("data")
        input_cid = (
            _cid_or_none(task_data.get("input_cid")) if isinstance(task_data, dict) else None
        )
        output_cid = _cid_or_none(st.get("result_cid")) or (
            _cid_or_none(result.get("output_cid")) if isinstance(result, dict) else None
        )
        fields = {"worker_id": worker, "task_id": st["task_id"], "data": data}
        self._nursery.start_soon(self._append_execution, fields, input_cid, output_cid)

    async def _append_execution(
        self, fields: dict[str, Any], input_cid: str | None, output_cid: str | None
    ) -> None:
        # Shielded: a record whose task is already completed must not be lost to shutdown.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(
                    lambda: self.services.provenance.append(
                        "worker_execution", fields, input_cid=input_cid, output_cid=output_cid
                    )
                )
                self.stats["provenance_records"] += 1
            except Exception as exc:
                self.stats["provenance_failures"] += 1
                log.warning(
                    "task %s is %s, but its provenance record could not be written: %s",
                    fields["task_id"], fields["data"]["task_status"], exc,
                )

    # ------------------------------------------------------------------ start / stop
    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._owner_addrs = self._compute_owner_addrs()
        self.host.get_network().register_notifee(_Notifee(self))
        self.host.set_stream_handler(PROTOCOL_ID, self.server.handle_stream)  # type: ignore[arg-type]
        self.host.set_stream_handler(
            block_protocol.PROTOCOL_ID,  # type: ignore[arg-type]
            self.block_server.handle_stream,  # type: ignore[arg-type]
        )
        self.pubsub.set_topic_validator(
            announce.TOPIC, announce.make_topic_validator(self.is_allowed), False
        )
        sub = await self.pubsub.subscribe(announce.TOPIC)
        self.tasks.add_listener(self._on_task_event)
        nursery.start_soon(self._drain_gossip, sub)
        nursery.start_soon(self._publisher)
        nursery.start_soon(self._event_pump)
        nursery.start_soon(self._reaper)
        nursery.start_soon(self._reannouncer)
        nursery.start_soon(self._background_lister)
        for addr in self.config.bootstrap_peers:
            nursery.start_soon(self._keep_connected, addr)
        self.services.set_peer_fetcher(self.fetch_blocks_sync)

    def _stop(self) -> None:
        self._closed = True
        self.services.set_peer_fetcher(None, only=self.fetch_blocks_sync)
        self.tasks.remove_listener(self._on_task_event)
        for held in self._held.values():
            if held.scope is not None:
                held.scope.cancel()

    def _compute_owner_addrs(self) -> list[str]:
        from libp2p.utils.address_validation import expand_wildcard_address

        out: list[str] = []
        for addr in self.host.get_transport_addrs():
            concrete = [addr]
            try:
                ip = addr.value_for_protocol("ip4")
            except Exception:
                ip = None
            if ip == "0.0.0.0":
                concrete = expand_wildcard_address(addr)
            for a in concrete:
                s = f"{_strip_p2p(a)}/p2p/{self.peer_id}"
                if s not in out:
                    out.append(s)
        return out

    # ------------------------------------------------------------------ connections
    def _on_connected(self, peer: ID) -> None:
        if not self.is_allowed(peer.to_base58()):
            # Closed to everyone else: no gossip either way; streams are refused by the server.
            self.stats["denied_peers"] += 1
            if not self.pubsub.is_peer_blacklisted(peer):
                self.pubsub.add_to_blacklist(peer)

    def _on_disconnected(self) -> None:
        self._disconnect_wake.set()
        self._disconnect_wake = trio.Event()

    async def connect(self, addr: str) -> str:
        """Dial a full multiaddr (``.../p2p/<id>``); returns the peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise ConfigError(f"{addr!r} is not a multiaddr with /p2p/<peer id>: {exc}") from None
        await self._dial(info)
        return info.peer_id.to_base58()

    async def _dial(self, info: PeerInfo) -> None:
        key = info.peer_id.to_base58()
        lock = self._dial_locks.setdefault(key, trio.Lock())
        async with lock:
            if self._is_connected(info.peer_id):
                return
            # The swarm refuses to dial a peer for 60 s after all its addresses failed once
            # (its "negative cache"); our callers pace their own redials with backoff, and a
            # restarted owner must be reachable again at once.
            unblock = getattr(self.host.get_network(), "unblock_peer", None)
            if unblock is not None:
                unblock(info.peer_id)
            with trio.fail_after(self.settings.dial_timeout):
                await self.host.connect(info)
            self.stats["dials"] += 1

    async def _keep_connected(self, addr: str) -> None:
        """Stay connected to one bootstrap peer: redial with exponential backoff after a drop."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception:
            log.error("bootstrap peer %r is not a multiaddr with /p2p/<id>; ignored", addr)
            return
        if info.peer_id == self.host.get_id():
            return
        backoff = self.settings.bootstrap_backoff_initial
        while True:
            if not self._is_connected(info.peer_id):
                self._bootstrap[addr] = False
                try:
                    await self._dial(info)
                except Exception as exc:
                    self.stats["bootstrap_dial_failures"] += 1
                    log.debug("bootstrap dial %s failed (%r); retry in %.2fs", addr, exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.settings.bootstrap_backoff_max)
                    continue
                self.stats["bootstrap_dials"] += 1
                backoff = self.settings.bootstrap_backoff_initial
            self._bootstrap[addr] = self._is_connected(info.peer_id)
            with trio.move_on_after(self.settings.bootstrap_check_interval):
                await self._disconnect_wake.wait()

    async def _ensure_connected(self, owner: str, addrs: Iterable[str]) -> ID:
        peer = _peer_id(owner)
        if self._is_connected(peer):
            return peer
        mas = []
        for a in addrs:
            try:
                mas.append(_strip_p2p(multiaddr.Multiaddr(a)))
            except Exception:
                continue
        if not mas:
            mas = list(self.host.get_peerstore().addrs(peer)) if self._known_addrs(peer) else []
        if not mas:
            raise PeerError(f"no address known for owner {owner}; it must announce owner_addrs")
        await self._dial(PeerInfo(peer, mas))
        return peer

    def _known_addrs(self, peer: ID) -> bool:
        try:
            return bool(self.host.get_peerstore().addrs(peer))
        except Exception:
            return False

    # ------------------------------------------------------------------ announcements (owner)
    def _on_task_event(self, event: dict[str, Any]) -> None:
        """TaskQueue listener: runs in whatever thread committed the change."""
        if self._closed:
            return
        if event.get("event") in ("submitted", "requeued"):
            self._local_work_hint = True
        if not _has_tag(event.get("tags") or (), TAG_P2P_ELIGIBLE):
            return
        self._events.append(event)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._wake_events)

    def _wake_events(self) -> None:
        self._wake_scheduled = False
        self._events_wake.set()

    async def _event_pump(self) -> None:
        while True:
            await self._events_wake.wait()
            self._events_wake = trio.Event()
            while self._events:
                self._handle_event(self._events.popleft())

    def _handle_event(self, ev: dict[str, Any]) -> None:
        name = ev.get("event")
        if name == "submitted" and ev["state"] == "pending":
            if (ev.get("available_at") or 0) <= time.time():
                self._queue_offer(ev)
        elif name in _EVENT_UPDATES:
            worker = ev.get("worker_id") or ""
            update = pb.TaskUpdate(
                task_id=ev["task_id"],
                state=STATE_TO_PB[ev["state"]],
                owner_peer_id=self.peer_id,
                worker_peer_id=worker if _looks_like_peer_id(worker) else (
                    self.peer_id if worker else ""
                ),
                attempt=int(ev.get("attempt") or 0),
            )
            tid = ev["task_id"]
            self._offered_at.pop(tid, None)
            if tid in self._published:
                kind = "claimed" if ev["state"] == "claimed" else "final"
                self._enqueue(tid, announce.encode_update(update), kind=kind)
            else:
                # Its offer never went out on gossip (still queued, or dropped): nobody needs
                # to hear that it is gone; a worker that listed it learns on claiming.
                self._dequeue(tid)
        # "requeued": the retry is claimable only after its backoff; the reaper offers it then.

    def _offer_pb(self, d: dict[str, Any]) -> pb.TaskOffer | None:
        offer = pb.TaskOffer(
            task_id=d["task_id"],
            task_type=d["task_type"],
            priority=int(d["priority"]),
            tags=list(d["tags"]),
            requires=list(d["requires"]),
            owner_peer_id=self.peer_id,
            owner_addrs=self._owner_addrs,
            submitted_at_ms=int(float(d["submitted_at"]) * 1000),
            attempt=int(d["attempt"]),
        )
        try:
            announce.check_offer(offer)
        except ProtocolError as exc:
            log.warning("task %r cannot be offered to peers: %s", d["task_id"], exc)
            return None
        return offer

    def _queue_offer(self, d: dict[str, Any]) -> None:
        queued = self._announce_q.get(d["task_id"])
        if (
            self._queued_offers >= 2 * self.settings.announce_burst
            and (queued is None or queued[0] != "offer")
        ):
            # A burst of submits: gossip already has a backlog of offers. Workers that heard
            # of this owner list its tasks directly; the re-announcer offers the rest later.
            self.stats["offers_deferred"] += 1
            return
        offer = self._offer_pb(d)
        if offer is not None:
            self._enqueue(offer.task_id, announce.encode_offer(offer), kind="offer")
            self._offered_at[offer.task_id] = trio.current_time()

    def _enqueue(self, task_id: str, payload: bytes, *, kind: str) -> None:
        """Coalescing queue: a newer announcement of a task replaces one not yet sent."""
        self._dequeue(task_id)
        if kind == "offer":
            self._queued_offers += 1
        self._announce_q[task_id] = (kind, payload)
        while len(self._announce_q) > _MAX_ANNOUNCE_BACKLOG:
            self._dequeue(next(iter(self._announce_q)))
        self._announce_wake.set()

    def _dequeue(self, task_id: str) -> tuple[str, bytes] | None:
        entry = self._announce_q.pop(task_id, None)
        if entry is not None and entry[0] == "offer":
            self._queued_offers -= 1
        return entry

    async def _publish_room(self) -> None:
        """Back-pressure: gossipsub drops RPCs silently once a peer's queue (32) is full."""
        queues = getattr(self.pubsub, "peer_queues", None)
        if not queues:
            return
        with trio.move_on_after(0.5):
            while any(len(q) > _PUBLISH_QUEUE_HIGH_WATER for q in list(queues.values())):
                await trio.sleep(0.002)

    async def _publisher(self) -> None:
        rate = max(self.settings.max_announce_rate, 0.001)
        burst = float(max(self.settings.announce_burst, 1))
        tokens, last = burst, trio.current_time()
        while True:
            if not self._announce_q:
                self._announce_wake = trio.Event()
                await self._announce_wake.wait()
                continue
            now = trio.current_time()
            tokens = min(burst, tokens + (now - last) * rate)
            last = now
            if tokens < 1:
                await trio.sleep((1 - tokens) / rate)
                continue
            await self._publish_room()
            if not self._announce_q:
                continue
            tid = next(iter(self._announce_q))
            kind, payload = self._dequeue(tid)  # type: ignore[misc]
            tokens -= 1
            try:
                await self.pubsub.publish(announce.TOPIC, payload)
                self.stats["announcements_sent"] += 1
            except Exception as exc:
                log.debug("publish failed: %r", exc)
                continue
            if kind == "offer":
                self._published[tid] = None
            elif kind == "final":
                self._published.pop(tid, None)

    async def announce_ids(self, task_ids: Iterable[str]) -> None:
        """Offer these tasks now if they are claimable P2P tasks (owner side)."""
        ids = list(task_ids)

        def load() -> list[dict[str, Any]]:
            out = []
            for tid in ids:
                try:
                    out.append(self.tasks.status(tid))
                except DatasetsError:
                    continue
            return out

        for st in await trio.to_thread.run_sync(load):
            if st["status"] == "pending" and _has_tag(st["tags"], TAG_P2P_ELIGIBLE):
                self._queue_offer(st)

    async def reannounce(self, *, everything: bool = False) -> int:
        """Offer again the best open tasks not offered within ``reannounce_interval``, at most
        ``reannounce_batch`` per call: a safety net for lost gossip, not a flood (workers also
        list an owner's offers directly)."""
        batch = self.settings.reannounce_batch
        offers = await trio.to_thread.run_sync(
            lambda: self.tasks.list_claimable(None, batch * 4, True)
        )
        now = trio.current_time()
        due = [
            d
            for d in offers
            if everything
            or now - self._offered_at.get(d["task_id"], -math.inf)
            >= self.settings.reannounce_interval
        ][:batch]
        for d in due:
            self._queue_offer(d)
        return len(due)

    async def _reaper(self) -> None:
        while True:
            await trio.sleep(self.settings.reap_interval)
            try:
                ids = await trio.to_thread.run_sync(self.tasks.reap_expired)
                if ids:
                    self.stats["reoffered_after_expiry"] += len(ids)
                    await self.announce_ids(ids)
            except DatasetsError as exc:
                log.warning("reaping expired leases failed: %s", exc)

    async def _reannouncer(self) -> None:
        # First pass soon after start: a restarted owner re-offers its unfinished tasks.
        await trio.sleep(min(1.0, self.settings.reannounce_interval))
        while True:
            try:
                await self.reannounce()
            except DatasetsError as exc:
                log.warning("re-announcing open tasks failed: %s", exc)
            await trio.sleep(self.settings.reannounce_interval)

    # ------------------------------------------------------------------ gossip in (worker)
    async def _drain_gossip(self, sub: Any) -> None:
        """Drain the subscription in its own task: libp2p's channel holds only 32 messages."""
        async for msg in sub:
            try:
                origin = ID(msg.from_id).to_base58()
                if origin == self.peer_id:
                    continue
                ann = announce.decode_announcement(msg.data, origin)
            except Exception:
                self.stats["announcements_rejected"] += 1
                continue
            self.stats["announcements_received"] += 1
            now = trio.current_time()
            if ann.WhichOneof("body") == "offer":
                self._note_owner(ann.offer)
                if ann.offer.task_id not in self._held and self.offers.add(ann.offer, now):
                    for callback in self._offer_listeners:
                        callback(ann.offer)
            else:
                self.offers.apply_update(ann.update)
            self.offers.expire(now)

    # ------------------------------------------------------------------ worker side
    def _note_owner(self, offer: pb.TaskOffer) -> None:
        owner = offer.owner_peer_id
        if owner == self.peer_id:
            return
        self._owners[owner] = tuple(offer.owner_addrs)

    def _owner_unreachable(self, owner: str, doing: str, exc: BaseException) -> None:
        """Back off from an owner that did not answer. Said at INFO when it stops answering,
        then at DEBUG on each retry until it answers again (a gone peer is not news)."""
        why = exc if str(exc) else type(exc).__name__
        if owner in self._owners_silent:
            log.debug("owner %s still does not answer (%s: %s)", owner, doing, why)
        else:
            self._owners_silent[owner] = None
            log.info("owner %s does not answer (%s: %s); retrying every %g s while its offers "
                     "last", owner, doing, why, self.settings.owner_backoff)
        self._owner_down_until[owner] = trio.current_time() + self.settings.owner_backoff

    def _owner_answered(self, owner: str) -> None:
        if self._owners_silent.pop(owner, False) is None:
            log.info("owner %s answers again", owner)

    def _owner_usable(self, owner: str, now: float) -> bool:
        return self.is_allowed(owner) and self._owner_down_until.get(owner, 0.0) <= now

    def _candidate_owners(self) -> set[str]:
        owners = set(self.offers.owners()) | set(self._owners)
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            try:
                if PROTOCOL_ID in store.get_protocols(peer):
                    owners.add(peer.to_base58())
            except Exception:
                continue
        owners.discard(self.peer_id)
        now = trio.current_time()
        return {o for o in owners if self._owner_usable(o, now)}

    async def refresh_offers(
        self, capabilities: Iterable[str] | None = None, *, force: bool = False
    ) -> int:
        """Ask owners for their open tasks (``ListRequest``): recovers offers missed on gossip.
        Returns how many owners answered."""
        caps = norm_capabilities(
            list(capabilities) if capabilities is not None else list(self.config.capabilities)
        )
        now = trio.current_time()
        due = [
            o
            for o in self._candidate_owners()
            if force
            or self._list_was_full.get(o, False)  # the owner has more: ask again at once
            or now - self._last_list.get(o, -math.inf) >= self.settings.list_min_interval
        ]
        answered = 0

        async def one(owner: str) -> None:
            nonlocal answered
            self._last_list[owner] = now
            try:
                peer = await self._ensure_connected(owner, self._owners.get(owner, ()))
                with trio.fail_after(self.settings.request_timeout):
                    listed = await self.client.list_offers(
                        peer, sorted(caps), self.settings.list_limit
                    )
            except ErrorResponse as exc:
                log.debug("owner %s refused a list: %s", owner, exc)
                return
            except Exception as exc:
                self._owner_unreachable(owner, "listing its offers", exc)
                return
            answered += 1
            self._owner_answered(owner)
            self.stats["lists"] += 1
            self._list_was_full[owner] = len(listed) >= self.settings.list_limit
            # The owner's answer replaces what we believed about its offers for these
            # capabilities: anything else is claimed, or listed to another worker.
            for o in self.offers.fitting(caps):
                if o.owner == owner:
                    self.offers.remove(o.task_id)
            t = trio.current_time()
            for offer in listed:
                try:
                    announce.check_offer(offer, owner)
                except ProtocolError:
                    continue
                if offer.task_id not in self._held:
                    self.offers.add(offer, t, authoritative=True)

        async with trio.open_nursery() as nursery:
            for owner in due:
                nursery.start_soon(one, owner)
        return answered

    async def _background_lister(self) -> None:
        """Workers that asked for work recently keep their view of owners' offers fresh."""
        while True:
            await trio.sleep(self.settings.list_background_interval)
            recent = self._recent_caps
            if recent is None or trio.current_time() - recent[1] > 60:
                continue
            try:
                await self.refresh_offers(recent[0])
            except Exception as exc:
                log.debug("background offer refresh failed: %r", exc)

    def _local_may_have_work(self) -> bool:
        """Skip the local peek (a thread hop) while the local queue is known to be empty;
        look again after a local submit/requeue, or every half second (other processes may
        share the queue)."""
        return self._local_work_hint or trio.current_time() - self._local_peeked_at > 0.5

    async def _local_best(self, caps: frozenset[str]) -> tuple[int, int, float, str] | None:
        self._local_peeked_at = trio.current_time()
        peek = await self.queue_call(lambda: self.tasks.list_claimable(sorted(caps), 16, False))
        if not peek:
            self._local_work_hint = False
            return None
        gpu = is_gpu_worker(caps)
        return min(
            rank_key(
                gpu,
                d["priority"],
                _has_tag(d["tags"], TAG_GPU_PREFERRED),
                d["submitted_at"],
                d["task_id"],
            )
            for d in peek
        )

    async def queue_call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, one call into the local TaskQueue, from the event loop.

        Run inline when it need not wait (``TaskQueue.nonblocking``): such a call is a few
        hundred microseconds of CPU, less than handing it to a thread and back, and the
        hand-off was the largest share of an owner's claim latency under load (bench_p2p:
        244-291 -> 332-340 tasks/s, interleaved). A call that would wait for another thread
        or process goes to a worker thread, so the loop itself never waits on a lock.
        """
        try:
            with self.tasks.nonblocking():
                return fn(*args)
        except QueueBusy:
            return await trio.to_thread.run_sync(fn, *args)

    async def get_next_task(
        self, worker_id: str, capabilities: Iterable[str] | None = None
    ) -> dict[str, Any] | None:
        """The best task for this worker from the local queue or a peer, claimed; or None."""
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidArgumentError("worker_id must be a non-empty string")
        caps_list = list(capabilities) if capabilities is not None else list(
            self.config.capabilities
        )
        caps = norm_capabilities(caps_list)
        self._recent_caps = (caps, trio.current_time())
        gpu = is_gpu_worker(caps)

        def remote_best() -> RemoteOffer | None:
            return self.offers.pick(
                caps, spread=self.settings.claim_spread, exclude_owners=self._excluded_owners()
            )

        offer = remote_best()
        if offer is None:
            grant = await self.queue_call(lambda: self.tasks.claim_next(worker_id, caps_list))
            if grant is not None:
                return grant
            if await self.refresh_offers(caps_list) == 0:
                return None
            offer = remote_best()
            if offer is None:
                return None
        elif self._local_may_have_work():
            local = await self._local_best(caps)
            if local is not None and local[:2] <= offer.keys[gpu][:2]:
                grant = await self.queue_call(
                    lambda: self.tasks.claim_next(worker_id, caps_list)
                )
                if grant is not None:
                    return grant

        refreshed = False
        for _ in range(self.settings.max_claim_attempts):
            if offer is None:
                if refreshed or await self.refresh_offers(caps_list) == 0:
                    return None
                refreshed = True
                offer = remote_best()
                if offer is None:
                    return None
            grant = await self._claim_remote(offer, worker_id, caps_list)
            if grant is not None:
                return grant
            offer = remote_best()
        return None

    def _excluded_owners(self) -> set[str]:
        now = trio.current_time()
        return {o for o, until in self._owner_down_until.items() if until > now} | {
            o for o in self.offers.owners() if not self.is_allowed(o)
        }

    async def _claim_remote(
        self, ro: RemoteOffer, worker_id: str, caps: list[str]
    ) -> dict[str, Any] | None:
        offer = ro.offer
        self.offers.remove(offer.task_id)
        if offer.task_id in self._held:
            return None
        owner = offer.owner_peer_id
        try:
            peer = await self._ensure_connected(owner, offer.owner_addrs)
            grant = await self.client.claim(peer, offer.task_id, caps)
        except ErrorResponse as exc:
            self.stats[f"claim_{exc.code_name.removeprefix('ERROR_CODE_').lower()}"] += 1
            return None
        except (Exception, trio.TooSlowError) as exc:
            self.stats["claim_unreachable"] += 1
            self._owner_unreachable(owner, f"claiming {offer.task_id}", exc)
            return None
        self._owner_answered(owner)
        now = time.time()
        expires = grant.lease_expires_at_ms / 1000
        # The grant carries an absolute expiry on the owner's clock (clocks are assumed
        # NTP-synced, as for any lease): derive the lease length, clamped to sane bounds.
        lease_seconds = min(max(expires - now, 0.5), 3600.0)
        held = HeldLease(
            task_id=grant.task_id,
            owner=owner,
            lease_id=grant.lease_id,
            worker_id=worker_id,
            lease_seconds=lease_seconds,
            expires_at=expires,
            attempt=grant.attempt,
            owner_addrs=tuple(offer.owner_addrs),
            scope=trio.CancelScope(),  # made here: a quick complete may cancel it before it runs
        )
        self._held[grant.task_id] = held
        self._remember_owner(grant.task_id, owner)
        self.stats["remote_claims"] += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._renew, held)
        try:
            data = decode_json(grant.data, "grant.data")
        except ProtocolError:
            data = None
        return {
            "task_id": grant.task_id,
            "task_type": grant.task_type or offer.task_type,
            "data": data,
            "data_cid": grant.data_cid or None,
            "priority": offer.priority,
            "tags": list(offer.tags),
            "requires": list(offer.requires),
            "attempt": grant.attempt,
            "lease_id": grant.lease_id,
            "lease_expires_at": expires,
            "lease_seconds": lease_seconds,
            "worker_id": worker_id,
            "owner": owner,
            "owner_peer_id": owner,
            "submitted_at": offer.submitted_at_ms / 1000,
            "remote": True,
        }

    def _remember_owner(self, task_id: str, owner: str) -> None:
        self._remote_owner[task_id] = owner

    async def _renew(self, held: HeldLease) -> None:
        """Keep a held remote lease alive until complete/fail (cancelled through held.scope)."""
        assert held.scope is not None
        with held.scope:
            failures = 0
            while True:
                interval = held.lease_seconds / 3 if failures == 0 else held.lease_seconds / 10
                await trio.sleep(max(0.1, min(interval, 30.0)))
                try:
                    peer = await self._ensure_connected(held.owner, held.owner_addrs)
                    await self.client.heartbeat(peer, held.task_id, held.lease_id)
                    held.expires_at = time.time() + held.lease_seconds
                    failures = 0
                    self.stats["lease_renewals"] += 1
                except ErrorResponse as exc:
                    held.lost = str(exc)
                    self.stats["leases_lost"] += 1
                    log.warning("lease on %s from %s lost: %s", held.task_id, held.owner, exc)
                    return
                except Exception as exc:
                    failures += 1
                    log.debug("lease renewal of %s failed (%r); retrying", held.task_id, exc)

    def holds(self, task_id: str) -> bool:
        """True when ``task_id`` is a remote task this node holds a lease on."""
        return task_id in self._held

    def _held_for(self, task_id: str, lease_id: str | None, worker_id: str | None) -> HeldLease:
        held = self._held[task_id]
        if lease_id is not None and lease_id != held.lease_id:
            raise LeaseError(
                f"task {task_id!r} is held under another lease; only the current lease holder "
                "may heartbeat, complete or fail it"
            )
        if worker_id is not None and worker_id != held.worker_id:
            raise LeaseError(
                f"task {task_id!r} is leased to worker {held.worker_id!r}, not {worker_id!r}"
            )
        return held

    async def _to_owner(
        self, held: HeldLease, call: Callable[[ID], Awaitable[T]], *, retries: int = 1
    ) -> T:
        """One request to the owner of a held task; transient network failures retried."""
        last: Exception | None = None
        for _ in range(retries + 1):
            try:
                peer = await self._ensure_connected(held.owner, held.owner_addrs)
                return await call(peer)
            except ErrorResponse as exc:
                raise from_error_response(exc, held.owner) from None
            except DatasetsError:
                raise
            except Exception as exc:
                last = exc
        raise PeerError(
            f"owner {held.owner} of task {held.task_id!r} is unreachable ({last!r}); the lease "
            "is still renewed, retry the call"
        )

    async def complete_task(
        self,
        task_id: str,
        result: Any,
        lease_id: str | None = None,
        result_cid: str | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        if task_id not in self._held:
            return await self.queue_call(
                lambda: self.tasks.complete(task_id, lease_id, result, result_cid, worker_id)  # type: ignore[arg-type]
            )
        held = self._held_for(task_id, lease_id, worker_id)
        try:
            payload = encode_json(result)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"result must be JSON-serialisable: {exc}") from None
        if len(payload) > MAX_FRAME_SIZE - 4096:
            raise InvalidArgumentError(
                f"the result of task {task_id!r} is {len(payload)} bytes of JSON, over what one "
                f"{MAX_FRAME_SIZE >> 20} MiB frame carries: store it as a block and pass "
                "result_cid instead"
            )
        if held.lost:
            self._held.pop(task_id, None)
            raise LeaseError(f"the lease on task {task_id!r} was lost: {held.lost}")
        try:
            ack = await self._to_owner(
                held,
                lambda peer: self.client.complete(
                    peer, task_id, held.lease_id, payload, result_cid or ""
                ),
            )
        except DatasetsError as exc:
            self._release_unless_transient(task_id, exc)
            raise
        self._release(task_id)
        self.stats["remote_completes"] += 1
        return {
            "task_id": task_id,
            "status": PB_TO_STATE.get(ack.state, "completed"),
            "owner": held.owner,
            "worker_id": held.worker_id,
            "remote": True,
        }

    async def fail_task(
        self,
        task_id: str,
        error: Any,
        retryable: bool = True,
        lease_id: str | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        if task_id not in self._held:
            return await self.queue_call(
                lambda: self.tasks.fail(task_id, lease_id, error, retryable, worker_id)  # type: ignore[arg-type]
            )
        held = self._held_for(task_id, lease_id, worker_id)
        text = str(error) if not isinstance(error, str) else error
        try:
            ack = await self._to_owner(
                held,
                lambda peer: self.client.fail(
                    peer, task_id, held.lease_id, text[:65536] or "failed", retryable
                ),
            )
        except DatasetsError as exc:
            self._release_unless_transient(task_id, exc)
            raise
        self._release(task_id)
        return {
            "task_id": task_id,
            "status": PB_TO_STATE.get(ack.state, "failed"),
            "owner": held.owner,
            "remote": True,
        }

    def _release_unless_transient(self, task_id: str, exc: DatasetsError) -> None:
        """An owner's refusal ends our lease; an unreachable or failing owner (plain
        PeerError) does not: the lease is still renewed and the call can be retried."""
        if type(exc) is not PeerError:
            self._release(task_id)

    def _release(self, task_id: str) -> None:
        held = self._held.pop(task_id, None)
        if held is not None and held.scope is not None:
            held.scope.cancel()

    async def heartbeat(
        self, task_id: str, lease_id: str | None = None, worker_id: str | None = None
    ) -> float:
        if task_id not in self._held:
            return await self.queue_call(
                lambda: self.tasks.heartbeat(task_id, lease_id, worker_id)  # type: ignore[arg-type]
            )
        held = self._held_for(task_id, lease_id, worker_id)
        if held.lost:
            raise LeaseError(f"the lease on task {task_id!r} was lost: {held.lost}")
        try:
            await self._to_owner(
                held, lambda peer: self.client.heartbeat(peer, task_id, held.lease_id)
            )
        except DatasetsError as exc:
            self._release_unless_transient(task_id, exc)
            raise
        held.expires_at = time.time() + held.lease_seconds
        return held.expires_at

    def _owner_of(self, task_id: str) -> str | None:
        if task_id in self._held:
            return self._held[task_id].owner
        if task_id in self._remote_owner:
            return self._remote_owner[task_id]
        return None

    async def get_task_status(self, task_id: str, owner: str | None = None) -> dict[str, Any]:
        """Status of a local task, or - for a task this node claimed from a peer, or with
        ``owner`` given - the owner's answer."""
        owner = owner or self._owner_of(task_id)
        if owner is None or owner == self.peer_id:
            try:
                return await self.queue_call(self.tasks.status, task_id)
            except DatasetsError:
                ro = self.offers.get(task_id)
                if ro is None:
                    raise
                owner = ro.owner
        peer = _peer_id(owner)
        try:
            ro = self.offers.get(task_id)
            await self._ensure_connected(owner, ro.offer.owner_addrs if ro else ())
            st = await self.client.status(peer, task_id)
        except ErrorResponse as exc:
            raise from_error_response(exc, owner) from None
        except DatasetsError:
            raise
        except Exception as exc:
            raise PeerError(f"owner {owner} of task {task_id!r} is unreachable: {exc!r}") from None
        try:
            result = decode_json(st.result, "status.result")
        except ProtocolError:
            result = None
        out: dict[str, Any] = {
            "task_id": st.task_id,
            "status": PB_TO_STATE.get(st.state, "pending"),
            "attempt": st.attempt,
            "worker_id": st.worker_peer_id or None,
            "result": result,
            "result_cid": st.result_cid or None,
            "error": st.error or None,
            "owner": owner,
            "remote": True,
        }
        # The wire's TaskStatus carries only the state; what the offer said fills in the rest.
        ro = self.offers.get(task_id)
        if ro is not None and ro.owner == owner:
            o = ro.offer
            out.update(task_type=o.task_type, priority=o.priority, tags=list(o.tags),
                       requires=list(o.requires), submitted_at=o.submitted_at_ms / 1000)
        return out

    async def submit_task(self, **kwargs: Any) -> dict[str, Any]:
        """``TaskQueue.submit`` through ``queue_call`` (the listener announces P2P tasks)."""
        kwargs.setdefault("owner", self.peer_id)
        return await self.queue_call(lambda: self.tasks.submit(**kwargs))

    async def submit_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """``TaskQueue.submit_many`` (one transaction) through ``queue_call``, owned by us."""
        items = list(tasks)
        return await self.queue_call(lambda: self.tasks.submit_many(items, owner=self.peer_id))


# ---------------------------------------------------------------------- one host per cache_dir
_running: set[Path] = set()


class _HostLock:
    """Only one process runs the P2P host of a cache_dir (one peer id, one host)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise NodeRunningError(
                f"another process runs the P2P host of {self.path.parent}; stop it or use "
                "another cache_dir (one identity must not run two hosts)"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def open_node(
    config: NodeConfig | dict[str, Any] | None = None,
    *,
    services: NodeServices | None = None,
    settings: P2PSettings | None = None,
) -> AsyncIterator[Node]:
    """Run a P2P node (trio) for ``config``; the node stops when the block exits.

    ``services`` lets a caller that already holds the node's services (the sync facade)
    share them; otherwise they are acquired from the per-cache_dir registry.
    """
    if services is not None:
        cfg = services.config
    else:
        cfg = config if isinstance(config, NodeConfig) else build_config(config)
    settings = settings or P2PSettings()
    if cfg.cache_dir in _running:
        raise NodeRunningError(
            f"a P2P node for {cfg.cache_dir} already runs in this process; share it instead"
        )
    own_services = services is None
    if own_services:
        services = acquire_services(cfg)
    assert services is not None
    lock = _HostLock(cfg.cache_dir / "p2p.lock")
    _running.add(cfg.cache_dir)
    body_error: BaseException | None = None
    try:
        await trio.to_thread.run_sync(lock.acquire)
        await trio.to_thread.run_sync(lambda: services.tasks)  # opens SQLite off the loop
        await trio.to_thread.run_sync(lambda: services.local_blocks)
        parts = build_host(services.identity, cfg.listen_addrs)
        listen = [multiaddr.Multiaddr(a) for a in cfg.listen_addrs]
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(parts.host.run(listen))
            if not parts.host.get_transport_addrs():
                raise ConfigError(
                    f"could not listen on {', '.join(cfg.listen_addrs)} (address in use, or not "
                    "an address of this machine): set listen_addrs, e.g. /ip4/0.0.0.0/tcp/0 "
                    "for any free port"
                )
            await stop_auto_connector(parts.host)
            await stack.enter_async_context(background_trio_service(parts.pubsub))
            await stack.enter_async_context(background_trio_service(parts.gossipsub))
            await parts.pubsub.wait_until_ready()
            nursery = await stack.enter_async_context(trio.open_nursery())
            node = Node(services, parts, settings)
            await node._start(nursery)
            try:
                yield node
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                node._stop()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own exception crossed five nurseries (ours and libp2p's): give it back
        # unwrapped rather than nested in exception groups.
        leaves = _leaves(group)
        if body_error is not None and all(e is body_error for e in leaves):
            raise body_error from None
        if len(leaves) == 1 and isinstance(leaves[0], DatasetsError):
            raise leaves[0] from None  # e.g. our own start-up refusal inside libp2p's nursery
        raise
    finally:
        _running.discard(cfg.cache_dir)
        lock.release()
        if own_services:
            release_services(services)
