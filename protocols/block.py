"""``/dsi/block/1.0.0``: block exchange between peers, server handler and client side by side
(like ``protocols.task``).

One ``dsi.v1.BlockRequest`` (at most ``MAX_CIDS`` CIDs) and one ``dsi.v1.BlockResponse`` per
stream, varint length-prefixed, a timeout on every step. The server answers only from what it
stores itself (a ``BlockSource`` implemented by ``node``) and packs as many blocks as fit in
one 4 MiB frame; the rest are listed as ``deferred`` for the client to ask again.

Why the client verifies here, not the caller: a peer is asked for content, never trusted with
it. ``BlockClient.request`` hashes every block against the CID it was asked for before
returning it, so no caller can forget; bytes that do not match are reported as ``rejected``
(and logged) and never returned.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from protocols._exchange import ExchangeServer, exchange
from protocols.codec import MAX_ITEM_LEN, parse_strict
from protocols.errors import ErrorResponse, MalformedMessageError
from protocols.framing import MAX_FRAME_SIZE
from protocols.pb import block_pb2 as bpb
from protocols.pb import task_pb2 as pb

if TYPE_CHECKING:
    from libp2p.abc import IHost
    from libp2p.peer.id import ID

PROTOCOL_ID = "/dsi/block/1.0.0"
DEFAULT_TIMEOUT = 10.0  # seconds for each of: open stream, write request, read response
MAX_CIDS = 256  # CIDs per request
# A request is at most MAX_CIDS strings of MAX_ITEM_LEN bytes plus their tags and lengths.
MAX_REQUEST_FRAME = MAX_CIDS * (MAX_ITEM_LEN + 4) + 64
# Room kept free in a response frame for the missing/deferred lists (MAX_CIDS short strings).
_LIST_RESERVE = MAX_CIDS * (MAX_ITEM_LEN + 4)
_SHA2_256 = 0x12
_IDENTITY = 0x00

logger = logging.getLogger("dsi.protocols.block")


class BlockSource(Protocol):
    """What the server needs from the node. Both reads are synchronous (the server runs them
    in a worker thread) and answer None for anything not servable: not stored, not a valid
    CID, or failing its own verification."""

    def is_allowed(self, peer_id: str) -> bool: ...

    def block_size(self, cid: str) -> int | None: ...

    def get_local(self, cid: str) -> bytes | None: ...


def block_matches(cid: str, data: bytes) -> bool:
    """True when ``data`` hashes to ``cid`` (sha2-256, or an identity multihash).

    A CID with any other hash function cannot be checked here and is refused: unverified
    bytes never leave this module.
    """
    import cid as pycid
    import multihash

    try:
        mh = multihash.decode(pycid.make_cid(cid).multihash)
    except Exception:
        return False
    if mh.code == _SHA2_256:
        return hashlib.sha256(data).digest() == mh.digest
    if mh.code == _IDENTITY:
        return bytes(data) == mh.digest
    return False


def check_block_request(req: bpb.BlockRequest) -> list[str]:
    """The requested CIDs, deduplicated in order; MalformedMessageError when invalid."""
    if not req.cids:
        raise MalformedMessageError("block request names no CID")
    if len(req.cids) > MAX_CIDS:
        raise MalformedMessageError(f"block request names more than {MAX_CIDS} CIDs")
    for c in req.cids:
        if not c or len(c) > MAX_ITEM_LEN:
            raise MalformedMessageError("block request holds an empty or over-long CID")
    return list(dict.fromkeys(req.cids))


def _block_cost(cid: str, size: int) -> int:
    """Upper bound of a ``Block`` entry's encoded size inside a BlockResponse."""
    return len(cid.encode()) + size + 24


def collect(source: BlockSource, cids: Sequence[str], budget: int) -> bpb.BlockResponse:
    """The response to ``cids`` from ``source`` (blocking: run it in a worker thread).

    Blocks go in, in request order, while they fit in ``budget`` bytes; a block that does not
    fit is deferred (without being read); a block larger than a whole frame can never travel
    on this protocol and is reported missing.
    """
    resp = bpb.BlockResponse()
    used = 0
    for c in cids:
        size = source.block_size(c)
        if size is None:
            resp.missing.append(c)
            continue
        cost = _block_cost(c, size)
        if cost > budget:
            logger.warning("block %s (%d bytes) is larger than a frame; not servable", c, size)
            resp.missing.append(c)
            continue
        if used + cost > budget:
            resp.deferred.append(c)
            continue
        data = source.get_local(c)
        if data is None:  # deleted (gc) or failed verification since the size check
            resp.missing.append(c)
            continue
        resp.blocks.append(bpb.Block(cid=c, data=data))
        used += cost
    return resp


def error_response(code: int, message: str) -> bpb.BlockResponse:
    return bpb.BlockResponse(error=pb.Error(code=code, message=message[:1024]))


class BlockServer(ExchangeServer[list[str], bpb.BlockResponse]):
    """The ``/dsi/block/1.0.0`` stream handler: ``host.set_stream_handler(PROTOCOL_ID,
    BlockServer(source).handle_stream)``."""

    protocol_id = PROTOCOL_ID

    def __init__(
        self,
        source: BlockSource,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame: int = MAX_FRAME_SIZE,
        max_concurrent: int = 16,
    ) -> None:
        # Each answer holds up to one frame of blocks in memory: bound how many at once.
        super().__init__(
            timeout=timeout,
            max_frame=max_frame,
            max_request_frame=MAX_REQUEST_FRAME,
            max_concurrent=max_concurrent,
        )
        self.source = source
        self.blocks_sent = 0

    def is_allowed(self, peer_id: str) -> bool:
        return self.source.is_allowed(peer_id)

    def error_response(self, code: int, message: str) -> bpb.BlockResponse:
        return error_response(code, message)

    def parse(self, data: bytes) -> list[str]:
        return check_block_request(parse_strict(bpb.BlockRequest, data))

    async def respond(self, peer_id: str, cids: list[str]) -> bpb.BlockResponse:
        budget = self.max_frame - _LIST_RESERVE
        try:
            resp = await trio.to_thread.run_sync(collect, self.source, cids, budget)
        except Exception as exc:  # the store failed: say so, keep serving
            logger.exception("reading blocks for %s failed", peer_id)
            return error_response(pb.ERROR_CODE_INTERNAL, f"store failed: {exc!r}")
        self.blocks_sent += len(resp.blocks)
        return resp


@dataclass
class BlockReply:
    """One peer's answer, already checked: ``blocks`` hold only verified bytes, keyed by the
    CID string as requested."""

    blocks: dict[str, bytes] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # bytes that did not hash to the CID


class BlockClient:
    """The requesting side: one stream per request, a timeout on each step.

    Raises ``ErrorResponse`` when the peer refuses the request, ``ProtocolError`` when the
    answer is malformed, ``trio.TooSlowError`` on a timeout, and libp2p's stream/swarm errors
    when the peer cannot be reached or does not speak the protocol.
    """

    def __init__(
        self, host: IHost, *, timeout: float = DEFAULT_TIMEOUT, max_frame: int = MAX_FRAME_SIZE
    ) -> None:
        self.host = host
        self.timeout = timeout
        self.max_frame = max_frame

    async def request(self, peer_id: ID, cids: Sequence[str]) -> BlockReply:
        wanted = list(dict.fromkeys(cids))
        if not wanted or len(wanted) > MAX_CIDS:
            raise ValueError(f"ask for 1 to {MAX_CIDS} CIDs per request, not {len(wanted)}")
        resp = await exchange(
            self.host, peer_id, PROTOCOL_ID, bpb.BlockRequest(cids=wanted), bpb.BlockResponse,
            timeout=self.timeout, max_frame=self.max_frame,
        )
        if resp.HasField("error"):
            raise ErrorResponse(resp.error.code, resp.error.message)
        return self._check(peer_id, wanted, resp)

    @staticmethod
    def _check(peer_id: ID, wanted: list[str], resp: bpb.BlockResponse) -> BlockReply:
        asked = set(wanted)
        reply = BlockReply()
        for block in resp.blocks:
            if block.cid not in asked or block.cid in reply.blocks:
                logger.warning("peer %s sent block %s that was not asked for", peer_id, block.cid)
                continue
            data = bytes(block.data)
            if block_matches(block.cid, data):
                reply.blocks[block.cid] = data
            else:
                logger.error(
                    "peer %s sent %d bytes for block %s that do not hash to its CID: rejected",
                    peer_id, len(data), block.cid,
                )
                reply.rejected.append(block.cid)
        answered = set(reply.blocks) | set(reply.rejected)
        reply.missing = [c for c in dict.fromkeys(resp.missing) if c in asked - answered]
        answered |= set(reply.missing)
        reply.deferred = [c for c in dict.fromkeys(resp.deferred) if c in asked - answered]
        answered |= set(reply.deferred)
        # A CID the peer did not mention at all counts as missing (never as "ask again":
        # the caller's retry loop must always make progress).
        reply.missing += [c for c in wanted if c not in answered]
        return reply
