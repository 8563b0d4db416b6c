"""Block exchange on the node: serve local blocks to peers, fetch missing ones from peers.

``LocalBlockSource`` lets ``protocols.block.BlockServer`` read the node's ``LocalBlockStore``
(only what is stored here: no Kubo, no forwarding). ``PeerBlockFetcher`` asks connected,
allowed peers for blocks over ``/dsi/block/1.0.0``: batches of at most ``MAX_CIDS`` CIDs, asks
again for what a full frame deferred, and moves on to the next peer for whatever one peer lacks.
Every block it returns was verified against its CID by ``BlockClient``; a peer that sent bytes
that do not match is logged and not asked again for ``block_peer_penalty`` seconds.

``node.storage.BlockService`` reaches this through a plain callable that the node installs on
its ``NodeServices`` while it runs (``node.storage`` never imports ``node.p2p``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import trio
from libp2p.peer.id import ID

from node.errors import DatasetsError
from node.p2p.settings import P2PSettings
from protocols.block import MAX_CIDS, BlockClient
from protocols.errors import ErrorResponse

if TYPE_CHECKING:
    from node.storage import LocalBlockStore

log = logging.getLogger("dsi.p2p.blocks")


class LocalBlockSource:
    """``protocols.block.BlockSource`` over the local store (blocking calls; the server runs
    them in a worker thread)."""

    def __init__(self, local: LocalBlockStore, is_allowed: Callable[[str], bool]) -> None:
        self.local = local
        self._is_allowed = is_allowed

    def is_allowed(self, peer_id: str) -> bool:
        return self._is_allowed(peer_id)

    def block_size(self, cid: str) -> int | None:
        try:
            return self.local.size(cid)
        except DatasetsError:  # not a CID we can parse
            return None

    def get_local(self, cid: str) -> bytes | None:
        try:
            return self.local.get(cid)  # verified on read: a damaged block is never served
        except DatasetsError as exc:
            log.debug("not serving %s: %s", cid, exc)
            return None


class PeerBlockFetcher:
    """Fetch blocks from connected peers (trio side)."""

    def __init__(
        self,
        client: BlockClient,
        peers: Callable[[], list[ID]],
        settings: P2PSettings,
        *,
        has_bootstrap: bool = False,
    ) -> None:
        self.client = client
        self._peers = peers
        self.settings = settings
        self._has_bootstrap = has_bootstrap
        self._bad_until: dict[ID, float] = {}
        self.stats = {"requests": 0, "blocks": 0, "rejected": 0, "peer_errors": 0}

    def _candidates(self, peers: Iterable[ID] | None) -> list[ID]:
        now = trio.current_time()
        if peers is not None:
            return list(peers)
        out = [p for p in self._peers() if self._bad_until.get(p, 0.0) <= now]
        random.shuffle(out)  # spread load; no peer is preferred
        return out

    async def _wait_for_a_peer(self) -> None:
        """Just started with bootstrap peers: give the first dial a moment to finish."""
        if not self._has_bootstrap:
            return
        with trio.move_on_after(self.settings.dial_timeout):
            while not self._peers():
                await trio.sleep(0.05)

    async def fetch(
        self, cids: Sequence[str], peers: Iterable[ID] | None = None
    ) -> dict[str, bytes]:
        """Verified bytes of as many of ``cids`` as connected peers have, keyed by the CID
        string as given. Asks ``peers`` in that order when given, else every connected,
        allowed peer. Never raises for a peer's failure; bounded by ``block_fetch_timeout``."""
        found: dict[str, bytes] = {}
        remaining = list(dict.fromkeys(cids))
        if not remaining:
            return found
        with trio.move_on_after(self.settings.block_fetch_timeout):
            if peers is None and not self._peers():
                await self._wait_for_a_peer()
            for peer in self._candidates(peers):
                if not remaining:
                    break
                await self._from_peer(peer, remaining, found)
                remaining = [c for c in remaining if c not in found]
        return found

    async def _from_peer(self, peer: ID, wanted: list[str], found: dict[str, bytes]) -> None:
        pending = list(wanted)
        while pending:
            batch, pending = pending[:MAX_CIDS], pending[MAX_CIDS:]
            self.stats["requests"] += 1
            try:
                reply = await self.client.request(peer, batch)
            except ErrorResponse as exc:
                log.info("peer %s refused a block request: %s", peer, exc)
                self.stats["peer_errors"] += 1
                return
            except (Exception, trio.TooSlowError) as exc:
                log.debug("block request to %s failed: %r", peer, exc)
                self.stats["peer_errors"] += 1
                return
            found.update(reply.blocks)
            self.stats["blocks"] += len(reply.blocks)
            if reply.rejected:
                # BlockClient logged each bad block; stop trusting this peer for a while
                # and let the caller's loop try the next one for what is still missing.
                self.stats["rejected"] += len(reply.rejected)
                self._bad_until[peer] = trio.current_time() + self.settings.block_peer_penalty
                log.error(
                    "peer %s sent corrupt data for %d block(s); asking other peers",
                    peer, len(reply.rejected),
                )
                return
            if reply.deferred:
                if not reply.blocks:  # no progress: the peer cannot send these after all
                    return
                pending = reply.deferred + pending
