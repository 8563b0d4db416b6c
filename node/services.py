"""One set of local services per ``cache_dir`` per process.

Facade objects (and the daemon) that name the same ``cache_dir`` share one ``NodeServices``:
one identity, one block store, one provenance chain, one task queue, and at most one P2P host.
Two hosts with one peer id must never exist, so the registry is the only way to get services.

The services themselves are synchronous and thread-safe: they are SQLite and file I/O, which
gain nothing from being async. The trio node (``node.p2p``) calls them through
``trio.to_thread``; the sync facade calls them directly and needs the trio thread only for P2P.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import NodeConfig
from node.errors import DatasetsError
from node.identity import Identity, load_or_create_identity

if TYPE_CHECKING:
    from node.p2p.portal import P2PHandle
    from node.provenance import ProvenanceStore
    from node.storage import BlockService, LocalBlockStore
    from node.tasks import TaskQueue

log = logging.getLogger("dsi.services")

# Verified blocks from peers keyed by the CID strings asked for, or None when no P2P node runs.
PeerFetcher = Callable[[Sequence[str]], "Mapping[str, bytes] | None"]


class NodeServices:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.ensure_dirs()
        self._lock = threading.RLock()
        self._p2p: P2PHandle | None = None
        self._closed = False
        # Its own lock: the node installs the fetcher while p2p() holds self._lock.
        self._fetcher_lock = threading.Lock()
        self._peer_fetcher: PeerFetcher | None = None
        self._p2p_autostart_failed = False

    @cached_property
    def identity(self) -> Identity:
        return load_or_create_identity(self.config.identity_path)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    @cached_property
    def local_blocks(self) -> LocalBlockStore:
        from node.storage import LocalBlockStore

        return LocalBlockStore(self.config.blocks_dir)

    @cached_property
    def blocks(self) -> BlockService:
        """Local store plus Kubo at the node's configured ``ipfs_api``."""
        return self.block_service(self.config.ipfs_api)

    def block_service(self, ipfs_api: str | None) -> BlockService:
        """A block service over the shared local store, talking to Kubo at ``ipfs_api``."""
        from node.storage import BlockService

        return BlockService(
            self.local_blocks,
            ipfs_api=ipfs_api,
            timeout=self.config.kubo_timeout,
            peer_fetcher=self.fetch_from_peers if self.config.enable_p2p else None,
        )

    # -- blocks from peers: node.storage asks, node.p2p answers (neither imports the other) ----
    def set_peer_fetcher(
        self, fetcher: PeerFetcher | None, *, only: PeerFetcher | None = None
    ) -> None:
        """Installed by the running P2P node (None when it stops; with ``only``, cleared
        only if it is still that one)."""
        with self._fetcher_lock:
            if only is not None and self._peer_fetcher != only:
                return
            self._peer_fetcher = fetcher

    def fetch_from_peers(self, cids: Sequence[str]) -> Mapping[str, bytes] | None:
        """Blocks from connected peers for every ``BlockService`` of this node (P2P on).

        Starts the P2P host on first need, as the task coordinator does, so a
        ``FilesystemHandler(enable_p2p=True)`` asks its bootstrap peers. None when P2P is off
        or cannot run here (e.g. another process runs this cache_dir's host).
        """
        fetcher = self._peer_fetcher
        if fetcher is None and self.config.enable_p2p and not self._closed:
            if self._p2p_autostart_failed:
                return None
            try:
                self.p2p()
            except DatasetsError as exc:
                self._p2p_autostart_failed = True
                log.warning("cannot ask peers for blocks: the P2P node did not start: %s", exc)
                return None
            fetcher = self._peer_fetcher
        return None if fetcher is None else fetcher(cids)

    @cached_property
    def provenance(self) -> ProvenanceStore:
        from node.provenance import ProvenanceStore

        return ProvenanceStore(self.config, self.identity, self.blocks)

    @cached_property
    def tasks(self) -> TaskQueue:
        from node.tasks import TaskQueue

        return TaskQueue(self.config.tasks_db)

    def p2p(self) -> P2PHandle:
        """Start (once) and return the P2P host running in its own trio thread."""
        with self._lock:
            if self._p2p is None:
                from node.p2p.portal import P2PHandle

                self._p2p = P2PHandle.start(self)
            return self._p2p

    @property
    def p2p_running(self) -> bool:
        return self._p2p is not None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._p2p is not None:
                self._p2p.stop()
                self._p2p = None
            for name in ("tasks", "provenance", "blocks", "local_blocks"):
                svc: Any = self.__dict__.pop(name, None)
                if svc is not None and hasattr(svc, "close"):
                    svc.close()


_registry: dict[Path, tuple[NodeServices, int]] = {}
_registry_lock = threading.Lock()


def acquire_services(config: NodeConfig) -> NodeServices:
    """The process-wide services of ``config.cache_dir``, created on first use (ref-counted)."""
    with _registry_lock:
        entry = _registry.get(config.cache_dir)
        if entry is None or entry[0]._closed:
            services = NodeServices(config)
            _registry[config.cache_dir] = (services, 1)
            return services
        services, count = entry
        _registry[config.cache_dir] = (services, count + 1)
        return services


def release_services(services: NodeServices) -> None:
    """Drop one reference; the last one closes the services (stops the P2P host)."""
    with _registry_lock:
        entry = _registry.get(services.config.cache_dir)
        if entry is None or entry[0] is not services:
            return
        count = entry[1] - 1
        if count > 0:
            _registry[services.config.cache_dir] = (services, count)
            return
        del _registry[services.config.cache_dir]
    services.close()


@atexit.register
def _close_all() -> None:
    with _registry_lock:
        entries = list(_registry.values())
        _registry.clear()
    for services, _ in entries:
        services.close()
