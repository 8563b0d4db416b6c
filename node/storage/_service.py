"""BlockService: the local store first, Kubo when it answers, and a queue for what Kubo missed.

Every write lands in the local store (same CIDs Kubo computes) before anything else happens,
so a missing or dying daemon never loses data. When Kubo answers, the new blocks are pushed
with ``block/put`` (the daemon's returned CID is checked against ours) and the root is pinned
there too. When it does not, the root is queued in the store's ``pending`` table (SQLite, so
the queue survives restarts) and ``sync()`` pushes it later. Reads try the local store, then
Kubo (``block/get``, each block verified against its CID and cached locally), then - with P2P
on - connected peers, through ``peer_fetcher``: a plain callable the running P2P node installs
(this package never imports ``node.p2p``). Blocks from peers are verified again here before they
are stored. Reading a file or folder that is neither local nor in Kubo first pulls its whole
DAG from peers level by level (root, then its children, ...), each level in batches, rather
than one request per 256 KiB block.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from node.errors import (
    BlockNotFoundError,
    CorruptBlockError,
    InvalidArgumentError,
    KuboUnavailableError,
    PathNotFoundError,
    StorageError,
)

from . import _unixfs
from ._cid import CID, CODECS, format_cid, parse_cid
from ._kubo import KuboClient
from ._local import LocalBlockStore

log = logging.getLogger(__name__)

PROBE_TTL = 2.0  # seconds an availability answer is reused
# ``fetcher(cid_strings) -> {cid_string: bytes}`` (what peers had), or None when P2P is not
# running. The bytes are untrusted until BlockService has checked them against the CID.
PeerFetcher = Callable[[Sequence[str]], "Mapping[str, bytes] | None"]
PEER_BATCH = 64  # CIDs per fetcher call while walking a DAG: at most ~16 MiB in memory
PROBE_TIMEOUT = 1.0


class StoredCID(str):
    """The CID string of added content, which also tells where the content went.

    ``cid.in_kubo`` is True when the content (and the pin, if asked) reached Kubo during the
    call, False when Kubo was unavailable: the content is then stored locally only and queued
    for ``sync()``. It compares, hashes and serialises as the plain CID string.
    """

    in_kubo: bool

    def __new__(cls, cid: str, in_kubo: bool = False) -> StoredCID:
        obj = super().__new__(cls, cid)
        obj.in_kubo = in_kubo
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (StoredCID, (str(self), self.in_kubo))


class BlockService:
    """Local blocks plus an optional Kubo RPC backend. Thread-safe."""

    def __init__(
        self,
        local: LocalBlockStore,
        ipfs_api: str | None = None,
        timeout: float = 30.0,
        *,
        workers: int | None = None,
        peer_fetcher: PeerFetcher | None = None,
    ) -> None:
        self.local = local
        self.peer_fetcher = peer_fetcher
        self.ipfs_api = ipfs_api or None
        self.timeout = timeout
        self.kubo: KuboClient | None = KuboClient(ipfs_api, timeout) if ipfs_api else None
        # Hashing releases the GIL and durable writes wait on fsync: a few more threads than
        # cores keep the CPUs busy; durable adds without syncfs want more fsyncs in flight to
        # keep the disk queue full (8 threads add ~1.3x faster than 4 on the 2-core VM).
        self._cpu_threads = min(8, max(4, (os.cpu_count() or 2) + 2))
        per_file_fsync = local.fsync and not local.batch_sync
        self._workers = workers or (8 if per_file_fsync else self._cpu_threads)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._probe: tuple[float, dict[str, Any] | None] | None = None

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="dsi-blocks")
            return self._pool

    def close(self) -> None:
        """Stop the worker threads and the HTTP client; the shared local store stays open."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if self.kubo is not None:
            self.kubo.close()

    def __enter__(self) -> BlockService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Kubo availability ----------------------------------------------------------------------
    def kubo_info(self) -> dict[str, Any] | None:
        """``{"api", "agent_version", "version", "peer_id"}`` when Kubo answers, else None.

        The answer is probed with a short timeout and reused for ``PROBE_TTL`` seconds.
        """
        if self.kubo is None:
            return None
        now = time.monotonic()
        with self._lock:
            if self._probe is not None and now - self._probe[0] < PROBE_TTL:
                return self._probe[1]
        info: dict[str, Any] | None
        try:
            ident = self.kubo.id(timeout=PROBE_TIMEOUT)
            ver = self.kubo.version(timeout=PROBE_TIMEOUT)
            info = {
                "api": self.ipfs_api,
                "agent_version": ident.get("AgentVersion"),
                "version": ver.get("Version"),
                "peer_id": ident.get("ID"),
            }
        except (KuboUnavailableError, StorageError):
            info = None
        with self._lock:
            self._probe = (time.monotonic(), info)
        return info

    def kubo_available(self) -> bool:
        return self.kubo_info() is not None

    def _mark_down(self) -> None:
        with self._lock:
            self._probe = (time.monotonic(), None)

    # -- blocks -------------------------------------------------------------------------------
    def put_block(self, data: bytes, codec: str = "raw") -> tuple[str, bool]:
        """Store a block locally (always) and in Kubo when it answers; returns (CID, in_kubo).

        When Kubo does not answer the block is queued for ``sync()`` in the same local
        transaction that stores it.
        """
        if self.kubo is None:
            return self.local.put(data, codec), False
        if not self.kubo_available():
            return self.local.put(data, codec, queue=True), False
        cid = self.local.put(data, codec)
        try:
            self._kubo_put(parse_cid(cid), data)
            return cid, True
        except (KuboUnavailableError, StorageError) as exc:
            log.warning("block %s kept locally, Kubo put failed: %s", cid, exc)
            self._mark_down()
        self.local.add_pending(cid, pin=False)
        return cid, False

    def _kubo_put(self, c: CID, data: bytes | memoryview) -> None:
        assert self.kubo is not None
        got = self.kubo.block_put(data, c.codec)
        if got.digest != c.digest:
            raise StorageError(f"Kubo stored {got} for block {c}: hashes differ")

    def get_block(self, cid: str | CID) -> bytes:
        """Verified bytes of ``cid``: local store first, then Kubo, then (P2P on) connected
        peers; whatever comes from elsewhere is cached locally."""
        c = parse_cid(cid)
        try:
            return self.local.get(c)
        except BlockNotFoundError:
            pass
        if self.kubo is None or not self.kubo_available():
            where = self._no_kubo()
        else:
            try:
                return self._fetch(c)
            except BlockNotFoundError as exc:
                if self.peer_fetcher is None:
                    raise
                where = str(exc)
        got = self._from_peers([c])
        if got is not None and c.digest in got:
            return got[c.digest]
        raise BlockNotFoundError(self._not_found(c, where, got is not None))

    def _no_kubo(self) -> str:
        return f"no Kubo API answers at {self.ipfs_api or '(none configured)'}"

    def _not_found(self, c: CID, where: str, asked_peers: bool) -> str:
        if not where.startswith("block "):
            where = f"block {c} is not in the local store and {where}"
        if self.peer_fetcher is None:
            return where
        if asked_peers:
            return f"{where}; no connected peer has it either (check bootstrap_peers)"
        return f"{where}; no P2P node runs to ask peers"

    def _from_peers(self, cids: Sequence[CID]) -> dict[bytes, bytes] | None:
        """Ask peers for ``cids``; store and return (by digest) the blocks that verify.
        None when there is no P2P node to ask."""
        if self.peer_fetcher is None or not cids:
            return None
        wanted = {str(c): c for c in cids}
        got = self.peer_fetcher(list(wanted))
        if got is None:
            return None
        out: dict[bytes, bytes] = {}
        for name, data in got.items():
            c = wanted.get(name)
            if c is None:
                continue
            try:
                self.local.put_block(c, data)  # hashes again: never store unverified bytes
            except CorruptBlockError as exc:
                log.error("discarding block %s from a peer: %s", c, exc)
                continue
            out[c.digest] = bytes(data)
        return out

    def _dag_from_peers(self, root: CID) -> None:
        """With P2P on, and ``root`` neither local nor reachable in Kubo: make its DAG local
        from peers a level at a time (root, its children, theirs, ...), each level one batched
        fetch, so reading a file costs a few requests rather than one per block. Blocks no
        peer has are left to ``get_block``, which names them."""
        if self.peer_fetcher is None or self.local.has(root):
            return
        if self.kubo is not None and self.kubo_available():
            return  # Kubo comes first; get_block still falls back to peers block by block
        got = self._from_peers([root])
        if got is None:
            return
        if root.digest not in got:
            raise BlockNotFoundError(self._not_found(root, self._no_kubo(), True))
        level = [root]
        seen = {root.digest}
        while level:
            nxt: list[CID] = []
            for c in level:
                try:
                    kids = self.local.children(c)
                except BlockNotFoundError:
                    continue
                for k in kids:
                    if k.digest not in seen:
                        seen.add(k.digest)
                        nxt.append(k)
            need = [k for k in nxt if not self.local.has(k)]
            for i in range(0, len(need), PEER_BATCH):
                if self._from_peers(need[i : i + PEER_BATCH]) is None:
                    return
            level = nxt

    def _fetch(self, c: CID) -> bytes:
        assert self.kubo is not None
        try:
            data = self.kubo.block_get(c)
        except KuboUnavailableError:
            self._mark_down()
            raise BlockNotFoundError(
                f"block {c} is not in the local store and Kubo stopped answering"
            ) from None
        except BlockNotFoundError:
            raise BlockNotFoundError(
                f"block {c} is neither in the local store nor in Kubo at {self.ipfs_api} "
                f"(waited {self.timeout:g} s)"
            ) from None
        if hashlib.sha256(data).digest() != c.digest:
            raise CorruptBlockError(str(c), f"Kubo at {self.ipfs_api} returned other bytes")
        self.local.put_digest(c.digest, CODECS[c.codec], (data,), len(data))
        return data

    def _read_into(self, c: CID, buf: bytearray) -> memoryview:
        try:
            return self.local.read_into(c, buf)
        except BlockNotFoundError:
            return memoryview(self.get_block(c))

    def has(self, cid: str | CID) -> bool:
        return self.local.has(cid)

    # -- Kubo pushing -------------------------------------------------------------------------
    def _push_dag(self, root: CID, pin: bool) -> None:
        """Put every block of ``root``'s DAG into Kubo, then pin it there."""
        assert self.kubo is not None
        for c in self.local.walk(root):
            self._kubo_put(c, self.local.get(c))
        if pin:
            self.kubo.pin_add(str(root), recursive=True)

    def _publish(self, root: CID, pin: bool) -> bool:
        """Push to Kubo now, or queue for sync(). Returns True when Kubo has it."""
        if self.kubo is not None and self.kubo_available():
            try:
                self._push_dag(root, pin)
                return True
            except (KuboUnavailableError, StorageError, BlockNotFoundError) as exc:
                log.warning("%s kept locally and queued for sync(): %s", root, exc)
                self._mark_down()
        if self.kubo is not None:
            self.local.add_pending(root, pin)
        return False

    def sync(self) -> dict[str, Any]:
        """Push every queued root to Kubo. Stops early (and keeps the rest) if Kubo is down."""
        pending = self.local.pending()
        pushed: list[str] = []
        failed: list[dict[str, str]] = []
        available = self.kubo is not None and self.kubo_available()
        if available:
            for c, pin in pending:
                try:
                    self._push_dag(c, pin)
                except (KuboUnavailableError, StorageError, BlockNotFoundError) as exc:
                    if isinstance(exc, BlockNotFoundError) and not self.local.has(c):
                        failed.append({"cid": str(c), "error": str(exc)})
                        self.local.remove_pending(c)
                        continue
                    self._mark_down()
                    available = False
                    break
                self.local.remove_pending(c)
                pushed.append(str(c))
        return {
            "pushed": pushed,
            "failed": failed,
            "remaining": len(self.local.pending()),
            "kubo_available": available,
        }

    # -- files and folders ----------------------------------------------------------------------
    def add_file(
        self,
        path: str | os.PathLike[str],
        *,
        pin: bool = True,
        cid_version: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> StoredCID:
        """Import a file (Kubo-identical CID), pin it, and publish it to Kubo if it answers."""
        p = _input_path(path)
        return self._import(lambda imp: imp.add_file(p), pin, cid_version, progress)

    def add_bytes(self, data: bytes, *, pin: bool = True, cid_version: int = 0) -> StoredCID:
        import io

        stream = io.BytesIO(data)
        return self._import(lambda imp: imp.add_stream(stream), pin, cid_version, None)

    def add_directory(
        self,
        path: str | os.PathLike[str],
        *,
        recursive: bool = True,
        pin: bool = True,
        cid_version: int = 0,
        progress: Callable[[int], None] | None = None,
    ) -> StoredCID:
        p = _input_path(path)
        return self._import(
            lambda imp: imp.add_directory(p, recursive=recursive), pin, cid_version, progress
        )

    def _import(
        self,
        build: Callable[[_unixfs.Importer], _unixfs.DagNode],
        pin: bool,
        cid_version: int,
        progress: Callable[[int], None] | None,
    ) -> StoredCID:
        """Run one import under the gc session: build the DAG, commit its rows, pin, publish."""
        with self.local.write_session():
            imp = _unixfs.Importer(self.local, self.pool, cid_version=cid_version,
                                   in_flight=2 * self._workers, progress=progress)
            try:
                node = build(imp)
                imp.flush()
            finally:
                imp.wait()  # no commit outlives the call, even a failed one
            if pin:
                self.local.pin(node.cid, recursive=True, check=False)
        return StoredCID(str(node.cid), self._publish(node.cid, pin))

    def _exporter(self, progress: Callable[[int], None] | None = None) -> _unixfs.Exporter:
        # One block buffer per thread; more threads than cores only cover cold-cache reads.
        return _unixfs.Exporter(self.get_block, self._read_into, self.pool,
                                in_flight=min(self._workers, self._cpu_threads),
                                progress=progress)

    def get_file(
        self,
        cid: str | CID,
        dest: str | os.PathLike[str],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Path:
        """Write a file or folder to ``dest``. A file goes *into* ``dest``, named by its CID,
        when ``dest`` is a folder or ends with a path separator (``out/``, as with ``cp``).

        Every block is verified; names in directory nodes that would leave ``dest`` raise
        UnsafePathError; files appear atomically (temp file + rename).
        """
        c = parse_cid(cid)
        if not isinstance(dest, (str, os.PathLike)):
            raise InvalidArgumentError(f"dest must be a path, got {type(dest).__name__}")
        text = os.fspath(dest)
        as_folder = isinstance(text, str) and text.endswith((os.sep, "/"))
        target = Path(text).expanduser()
        self._dag_from_peers(c)
        info = _unixfs.node_info(c, self.get_block(c))
        if info.type == "file" and (as_folder or (target.is_dir() and not target.is_symlink())):
            target = target / str(cid).strip()
        self._exporter(progress).export(c, target)
        return target

    def cat(self, cid: str | CID) -> bytes:
        c = parse_cid(cid)
        self._dag_from_peers(c)
        return b"".join(_unixfs.iter_file(c, self.get_block))

    def stat(self, cid: str | CID) -> dict[str, Any]:
        c = parse_cid(cid)
        info = _unixfs.node_info(c, self.get_block(c))
        return {"cid": str(cid).strip(), "type": info.type, "size": info.size}

    def ls(self, cid: str | CID) -> list[dict[str, Any]]:
        """Entries of a folder: name, cid, size (file bytes; DAG bytes for folders), type."""
        c = parse_cid(cid)
        out = []
        for entry in _unixfs.iter_directory(c, self.get_block):
            info = _unixfs.node_info(entry.cid, self.get_block(entry.cid))
            out.append(
                {"name": entry.name, "cid": str(entry.cid), "size": info.size, "type": info.type}
            )
        return out

    # -- pins and gc ----------------------------------------------------------------------------
    def pin(self, cid: str | CID, recursive: bool = True) -> bool:
        """Pin locally (fetching missing blocks from Kubo) and in Kubo; True if Kubo has it."""
        c = parse_cid(cid)
        with self.local.write_session():
            if recursive:
                self._ensure_local(c)
            elif not self.local.has(c):
                self.get_block(c)
            self.local.pin(c, recursive=recursive)
        return self._publish(c, True)

    def _ensure_local(self, root: CID) -> None:
        """Make the whole DAG local, fetching (and verifying) missing blocks from Kubo (or,
        with P2P on, from peers)."""
        self._dag_from_peers(root)
        stack = [root]
        seen: set[bytes] = set()
        while stack:
            c = stack.pop()
            if c.digest in seen:
                continue
            seen.add(c.digest)
            try:
                kids = self.local.children(c)
            except BlockNotFoundError:
                kids = self.local.links(c, self.get_block(c))
            stack.extend(kids)

    def unpin(self, cid: str | CID) -> bool:
        c = parse_cid(cid)
        was = self.local.unpin(c)
        if self.kubo is not None and self.kubo_available():
            with contextlib.suppress(KuboUnavailableError, StorageError):
                self.kubo.pin_rm(str(c))
        return was

    def pins(self) -> list[dict[str, Any]]:
        return self.local.pins()

    def gc(self) -> dict[str, int]:
        return self.local.gc()

    def status(self) -> dict[str, Any]:
        info = self.kubo_info()
        return {
            "backend": "kubo+local" if info else "local",
            "ipfs_api": self.ipfs_api,
            "kubo": info,
            "blocks_dir": str(self.local.root),
            "pending_sync": len(self.local.pending()),
        }


def _input_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"path must be a string or path, got {type(path).__name__}")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise PathNotFoundError(f"{p} does not exist")
    if not os.access(p, os.R_OK):
        raise PathNotFoundError(f"{p} cannot be read (permission denied)")
    return p


__all__ = ["BlockService", "StoredCID", "format_cid"]
