"""The local content-addressed block store under ``cache_dir/blocks``.

Layout, chosen by measurement on this project's 2-core VM (ext4):

* ``index.sqlite`` (WAL): one row per block (sha2-256 digest, codec, size), the pins and the
  queue of roots not yet pushed to Kubo. Blocks of at most ``INLINE_MAX`` (64 KiB) live *in*
  the row: provenance records, directory and tree nodes, small files. A put is one autocommit
  INSERT (6,000-13,000/s single-threaded here while other jobs load the machine, ~25,000/s
  idle; ``put_many`` ~40,000/s), where a file per block would cost an open/write/rename
  (~0.25 ms) and, durably, an fsync (~0.9 ms).
* larger blocks (256 KiB file chunks) are one file each, ``<2 hex>/<64 hex>`` like Kubo's
  flatfs: written to a unique temp file in the shard directory, fsynced, then renamed, so a
  reader sees either nothing or the whole block; SQLite is slower than files for such blobs
  and would funnel every chunk through one writer lock.

Durability policy (``fsync``, default on; ``DSI_STORAGE_FSYNC=0`` or ``fsync=False`` turns it
off): block files and their directory entries are on disk *before* the index rows that name
them commit, so a row never points at bytes a power loss could take away. Bulk writes (an add,
``put_many``) write their files to the page cache and, before each batch of rows commits, flush
the filesystem once with Linux ``syncfs``: 128 MiB in 256 KiB files flushed at 1.4-2x the
throughput of an fsync per file with 8 in flight, close to one big file's write+fsync, and a
256 MiB add ran ~1.2x faster (A/B, same run), because the filesystem journal commits once
per batch instead of once per file. (It also flushes other
programs' dirty data on that filesystem, which is why single-block puts keep per-file fsync.)
Where ``syncfs`` is missing, each file is fsynced by the worker that wrote it (several in
parallel) and each touched shard directory once per batch. SQLite runs with
``synchronous=NORMAL`` in WAL mode: a process crash loses nothing committed; a power loss may
lose the last commits (those blocks are then absent and can be added again) but never corrupts.
Every read re-hashes the bytes: a corrupt block raises CorruptBlockError naming the CID.
Bulk reads (``read_into``, used by get_file) open a block's file directly, without an index
lookup: files only ever appear complete (rename) and the hash decides; a missing file or a
mismatch falls back to the index, which tells inline, absent and corrupt blocks apart.

Concurrency: every method is thread-safe (one SQLite connection per thread). Several processes
may share one store: rows are ``INSERT OR IGNORE``, temp names are unique per writer, renames
are atomic and identical content makes the race harmless. Garbage collection takes an exclusive
``flock`` on ``gc.lock``; imports hold it shared from the first chunk to the pin, so gc never
deletes blocks of an add that has not pinned its root yet. gc roots: pins, roots queued for
Kubo, and every dag-json block (provenance records) with whatever it links to. A lone block put
with ``put()`` is not protected until a pin or a record references it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import itertools
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from node._sqlite import enable_wal
from node.errors import BlockNotFoundError, CorruptBlockError, InvalidCIDError, StorageError

from . import _dagpb
from ._cid import CID, CODECS, cid_from_binary, format_cid, parse_cid

INLINE_MAX = 64 * 1024
_CODE_TO_NAME = {code: name for name, code in CODECS.items()}
_TMP_MAX_AGE = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    digest BLOB PRIMARY KEY,      -- sha2-256 digest (the block's identity)
    codec  INTEGER NOT NULL,      -- multicodec of the first put (raw, dag-pb, dag-json)
    size   INTEGER NOT NULL,
    data   BLOB                   -- the bytes, or NULL when they are in a file
);
CREATE INDEX IF NOT EXISTS blocks_by_codec ON blocks(codec);
CREATE TABLE IF NOT EXISTS pins (
    digest    BLOB PRIMARY KEY,
    codec     INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    recursive INTEGER NOT NULL,
    pinned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (   -- roots stored locally but not yet in Kubo
    digest    BLOB PRIMARY KEY,
    codec     INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    pin       INTEGER NOT NULL,
    queued_at REAL NOT NULL
);
"""


def _load_syncfs() -> Callable[[int], int] | None:
    """libc ``syncfs(fd)`` (Linux >= 2.6.39), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


def _env_fsync() -> bool:
    value = os.environ.get("DSI_STORAGE_FSYNC", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


class LocalBlockStore:
    """Content-addressed blocks on disk; see the module docstring for the design."""

    def __init__(self, blocks_dir: str | os.PathLike[str], *, fsync: bool | None = None) -> None:
        self.root = Path(blocks_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_str = os.fspath(self.root)
        self.fsync = _env_fsync() if fsync is None else fsync
        # Batched durability (see the module docstring): files of a bulk write are made durable
        # together by one syncfs before their rows commit.
        self.batch_sync = self.fsync and _SYNCFS is not None
        self._db_path = self.root / "index.sqlite"
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        # gc lock: shared while writing, exclusive while collecting (see module docstring)
        self._lock_path = self.root / "gc.lock"
        self._session_lock = threading.Lock()
        self._session_depth = 0
        self._session_fd: int | None = None
        self._tmp_seq = itertools.count(1)  # next() is atomic under the GIL
        conn = self._conn()
        enable_wal(conn)
        with conn:
            conn.executescript(_SCHEMA)

    # -- plumbing ---------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StorageError(f"block store {self.root} is closed")
            conn = sqlite3.connect(
                self._db_path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=60000")
            # Small blocks (provenance records) land at random places of the digest index.
            # A bounded 8 MiB cache keeps more of it, and checkpointing every ~40 MB of WAL
            # instead of 4 MB writes a page dirtied by several batches back once: on a
            # 1M-record store this cut indexing cost by about a third.
            conn.execute("PRAGMA cache_size=-8192")
            conn.execute("PRAGMA wal_autocheckpoint=10000")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def __enter__(self) -> LocalBlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def write_session(self) -> Iterator[None]:
        """Hold the gc lock shared (re-entrant, all threads of this process share one hold)."""
        with self._session_lock:
            if self._session_depth == 0:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._session_fd = fd
            self._session_depth += 1
        try:
            yield
        finally:
            with self._session_lock:
                self._session_depth -= 1
                if self._session_depth == 0 and self._session_fd is not None:
                    os.close(self._session_fd)  # closing drops the flock
                    self._session_fd = None

    def block_path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.root / h[:2] / h

    # -- writing ----------------------------------------------------------------------------
    def put(
        self, data: bytes | bytearray | memoryview, codec: str = "raw", *, queue: bool = False
    ) -> str:
        """Store ``data`` and return its CIDv1 (base32, sha2-256).

        ``queue=True`` also records the block as waiting for Kubo (``pending``), in the same
        transaction: that is how BlockService keeps a record it could not push.
        """
        code = CODECS.get(codec)
        if code is None:
            raise InvalidCIDError(f"unsupported codec {codec!r}; known: {', '.join(CODECS)}")
        digest = hashlib.sha256(data).digest()
        self.put_digest(digest, code, (data,), len(data), queue=queue)
        return format_cid(1, codec, digest)

    def put_many(self, items: Iterable[tuple[bytes, str]]) -> list[str]:
        """Store many small blocks in one transaction (fast path for bursts of records)."""
        rows: list[tuple[bytes, int, int, bytes | None]] = []
        cids: list[str] = []
        with self.write_session():
            for data, codec in items:
                code = CODECS.get(codec)
                if code is None:
                    raise InvalidCIDError(f"unsupported codec {codec!r}")
                digest = hashlib.sha256(data).digest()
                cids.append(format_cid(1, codec, digest))
                if len(data) > INLINE_MAX:
                    self.write_file(digest, (data,), batched=True)
                    rows.append((digest, code, len(data), None))
                else:
                    rows.append((digest, code, len(data), bytes(data)))
            self.index(rows)
        return cids

    def put_block(self, cid: str | CID, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``cid`` after checking that it hashes to it."""
        c = parse_cid(cid)
        if hashlib.sha256(data).digest() != c.digest:
            raise CorruptBlockError(str(c), "refusing to store bytes that do not match the CID")
        self.put_digest(c.digest, CODECS[c.codec], (data,), len(data))

    def put_digest(
        self, digest: bytes, code: int, pieces: tuple[Any, ...], size: int, *,
        queue: bool = False,
    ) -> None:
        """Store a block whose digest the caller computed (and verified)."""
        row: tuple[bytes, int, int, bytes | None]
        if size > INLINE_MAX:
            if not self.has_file_block(digest):
                self.write_file(digest, pieces)
                self.sync_dirs([digest])
            row = (digest, code, size, None)
        else:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            row = (digest, code, size, bytes(data))
        # One short transaction; no gc lock: a lone block is only safe from gc once something
        # references or pins it, and holding the lock for this call would not change that.
        insert = "INSERT OR IGNORE INTO blocks(digest, codec, size, data) VALUES (?,?,?,?)"
        if not queue:
            self._conn().execute(insert, row)  # autocommit: one statement, one commit
            return
        with self._tx() as conn:
            conn.execute(insert, row)
            if queue:
                conn.execute(
                    "INSERT OR IGNORE INTO pending(digest, codec, version, pin, queued_at)"
                    " VALUES (?,?,1,0,?)",
                    (digest, code, time.time()),
                )

    def write_file(self, digest: bytes, pieces: tuple[Any, ...], *, batched: bool = False) -> None:
        """Atomically write one block file (temp, fsync, rename); no index row yet.

        ``batched``: the caller commits the row through ``index``, which makes the file
        durable (``syncfs``) first, so no fsync of its own when that is available.
        """
        # plain strings, not Path objects: this runs once per 256 KiB chunk
        h = digest.hex()
        shard = f"{self._root_str}/{h[:2]}"
        final = f"{shard}/{h}"
        tmp = f"{shard}/.{h}.{os.getpid()}.{threading.get_ident()}.{next(self._tmp_seq)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileNotFoundError:
            os.makedirs(shard, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            total = sum(len(p) for p in pieces)
            written = os.writev(fd, list(pieces))
            while written < total:  # short writes are legal; finish the rest
                rest = b"".join(bytes(p) for p in pieces)[written:]
                written += os.write(fd, rest)
            if self.fsync and not (batched and self.batch_sync):
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, final)

    def sync_dirs(self, digests: Iterable[bytes], pool: Executor | None = None) -> None:
        """fsync the shard directories of freshly renamed block files (once per shard).

        With a pool the fsyncs run concurrently, which lets the journal commit them together.
        """
        if not self.fsync:
            return
        shards = sorted({d.hex()[:2] for d in digests})

        def sync_one(shard: str) -> None:
            fd = os.open(self.root / shard, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        if pool is None or len(shards) < 2:
            for shard in shards:
                sync_one(shard)
        else:
            for _ in pool.map(sync_one, shards):
                pass

    def sync_filesystem(self) -> None:
        """Flush everything written to the store's filesystem (files and renames) to disk."""
        assert _SYNCFS is not None
        fd = os.open(self._root_str, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise StorageError(f"syncfs of {self.root} failed: {os.strerror(err)}; the "
                                   "blocks just written may not be on disk")
        finally:
            os.close(fd)

    def index(
        self, rows: list[tuple[bytes, int, int, bytes | None]], pool: Executor | None = None
    ) -> None:
        """Commit index rows, after the files they point to (and their renames) are durable."""
        if not rows:
            return
        file_digests = [r[0] for r in rows if r[3] is None]
        if file_digests:
            if self.batch_sync:
                self.sync_filesystem()
            else:
                self.sync_dirs(file_digests, pool)
        with self._tx() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO blocks(digest, codec, size, data) VALUES (?,?,?,?)", rows
            )

    # -- reading ----------------------------------------------------------------------------
    def has_digest(self, digest: bytes) -> bool:
        row = self._conn().execute(
            "SELECT data IS NULL FROM blocks WHERE digest=?", (digest,)
        ).fetchone()
        if row is None:
            return False
        # A file-backed row whose file vanished (deleted by hand) is treated as absent so the
        # next put repairs it.
        h = digest.hex()
        return not row[0] or os.path.exists(f"{self._root_str}/{h[:2]}/{h}")

    def has_file_block(self, digest: bytes) -> bool:
        """``has_digest`` for a block too big to be inline: a stat answers most calls.

        No file means not stored (``has_digest`` says the same); only a file that exists needs
        its index row checked.
        """
        h = digest.hex()
        return os.path.exists(f"{self._root_str}/{h[:2]}/{h}") and self.has_digest(digest)

    def has(self, cid: str | CID) -> bool:
        return self.has_digest(parse_cid(cid).digest)

    def size(self, cid: str | CID) -> int | None:
        row = self._conn().execute(
            "SELECT size FROM blocks WHERE digest=?", (parse_cid(cid).digest,)
        ).fetchone()
        return None if row is None else int(row[0])

    def get(self, cid: str | CID) -> bytes:
        """The verified bytes of ``cid``; BlockNotFoundError / CorruptBlockError otherwise."""
        c = parse_cid(cid)
        data = self._read(c)
        if hashlib.sha256(data).digest() != c.digest:
            raise CorruptBlockError(str(c))
        return data

    def _read(self, c: CID) -> bytes:
        row = self._conn().execute(
            "SELECT size, data FROM blocks WHERE digest=?", (c.digest,)
        ).fetchone()
        if row is None:
            raise BlockNotFoundError(f"block {c} is not in the local store ({self.root})")
        if row[1] is not None:
            return bytes(row[1])
        try:
            with open(self.block_path(c.digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise CorruptBlockError(str(c), "its file is missing from the store") from None

    def read_into(self, c: CID, buf: bytearray) -> memoryview:
        """Read and verify ``c`` into ``buf`` (grown if needed); returns a view of the bytes.

        The get_file pipeline uses this to avoid a copy per 256 KiB block. A file-backed block
        is read straight from its file, without an index lookup: the hash check decides, and a
        file is only ever renamed into place complete. Inline blocks (and blocks without a
        file) go through the index.
        """
        view = self._read_file_into(c.digest, buf)
        if view is not None:
            if hashlib.sha256(view).digest() == c.digest:
                return view
            del view  # a mismatch: re-read carefully below before calling it corrupt
        row = self._conn().execute(
            "SELECT size, data FROM blocks WHERE digest=?", (c.digest,)
        ).fetchone()
        if row is None:
            raise BlockNotFoundError(f"block {c} is not in the local store ({self.root})")
        size, inline = int(row[0]), row[1]
        if inline is not None:
            view = memoryview(inline)
        else:
            if len(buf) < size + 1:
                buf.extend(bytes(size + 1 - len(buf)))
            try:
                with open(self.block_path(c.digest), "rb", buffering=0) as f:
                    n = 0
                    mv = memoryview(buf)
                    while True:  # read one past the size to notice a longer (corrupt) file
                        got = f.readinto(mv[n : size + 1])
                        if not got:
                            break
                        n += got
                        if n > size:
                            break
            except FileNotFoundError:
                raise CorruptBlockError(str(c), "its file is missing from the store") from None
            view = memoryview(buf)[:n]
        if hashlib.sha256(view).digest() != c.digest:
            raise CorruptBlockError(str(c))
        return view

    def _read_file_into(self, digest: bytes, buf: bytearray) -> memoryview | None:
        """The bytes of ``digest``'s block file read into ``buf`` (unverified), or None.

        One open and usually one read: a read shorter than ``buf`` is the end of a regular
        file; a full one grows ``buf`` and goes on.
        """
        h = digest.hex()
        try:
            fd = os.open(f"{self._root_str}/{h[:2]}/{h}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            n = 0
            while True:
                if n == len(buf):
                    buf.extend(bytes(max(len(buf), 1 << 16)))
                with memoryview(buf) as mv:
                    got = os.readv(fd, [mv[n:]])
                if not got:
                    break
                n += got
                if n < len(buf):
                    break
        finally:
            os.close(fd)
        return memoryview(buf)[:n]

    def iter_cids(self, codec: str | None = None) -> Iterator[str]:
        """Every stored block as a CIDv1 string, optionally only one codec."""
        conn = self._conn()
        if codec is None:
            cur = conn.execute("SELECT digest, codec FROM blocks")
        else:
            code = CODECS.get(codec)
            if code is None:
                raise InvalidCIDError(f"unsupported codec {codec!r}")
            cur = conn.execute("SELECT digest, codec FROM blocks WHERE codec=?", (code,))
        while True:
            rows = cur.fetchmany(1000)
            if not rows:
                return
            for digest, code_ in rows:
                yield format_cid(1, _CODE_TO_NAME[code_], digest)

    def count(self) -> int:
        return int(self._conn().execute("SELECT count(*) FROM blocks").fetchone()[0])

    def delete(self, cid: str | CID) -> bool:
        c = parse_cid(cid)
        with self._tx() as conn:
            row = conn.execute("SELECT data IS NULL FROM blocks WHERE digest=?", (c.digest,))
            found = row.fetchone()
            conn.execute("DELETE FROM blocks WHERE digest=?", (c.digest,))
        if found and found[0]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.block_path(c.digest))
        return found is not None

    # -- DAG walking --------------------------------------------------------------------------
    def links(self, c: CID, data: bytes | None = None) -> list[CID]:
        """Child CIDs of a block: dag-pb links, or ``{"/": cid}`` links in dag-json."""
        if c.codec == "raw":
            return []
        if data is None:
            data = self.get(c)
        out: list[CID] = []
        if c.codec == "dag-pb":
            try:
                node = _dagpb.decode_node(data)
            except _dagpb.DecodeError as exc:
                raise CorruptBlockError(str(c), f"not valid dag-pb: {exc}") from None
            for link in node.links:
                with contextlib.suppress(InvalidCIDError):  # links to foreign hashes: skip
                    out.append(cid_from_binary(link.hash))
        elif c.codec == "dag-json":
            with contextlib.suppress(ValueError):
                _json_links(json.loads(data), out)
        return out

    def children(self, c: CID) -> list[CID]:
        """Child CIDs of a stored block, for walking a DAG (pin checks, gc, pushes).

        Raises BlockNotFoundError if ``c`` is absent. Link discovery does not re-hash: a
        canonical dag-pb node with links starts with field 2 (``0x12``), so one byte tells a
        256 KiB file leaf (``0x0a``) from a tree node without reading it. Reads that return
        data (get, get_file, sync) always verify.
        """
        row = self._conn().execute(
            "SELECT size, data FROM blocks WHERE digest=?", (c.digest,)
        ).fetchone()
        if row is None or (row[1] is None and not self.block_path(c.digest).exists()):
            raise BlockNotFoundError(f"block {c} is not in the local store ({self.root})")
        if c.codec == "raw":
            return []
        data = row[1]
        if data is None:
            with open(self.block_path(c.digest), "rb") as f:
                first = f.read(1)
                if c.codec == "dag-pb" and first != b"\x12":
                    return []
                data = first + f.read()
        return self.links(c, bytes(data))

    def walk(self, root: CID, *, missing_ok: bool = False) -> Iterator[CID]:
        """Every CID of the DAG under ``root`` (each once), depth first."""
        seen: set[bytes] = set()
        stack = [root]
        while stack:
            c = stack.pop()
            if c.digest in seen:
                continue
            seen.add(c.digest)
            try:
                kids = self.children(c)
            except BlockNotFoundError:
                if missing_ok:
                    continue
                raise
            yield c
            stack.extend(reversed(kids))

    # -- pins and gc --------------------------------------------------------------------------
    def pin(self, cid: str | CID, recursive: bool = True, *, check: bool = True) -> None:
        """Protect ``cid`` (and with ``recursive`` its whole DAG, which must be present).

        ``check=False`` skips the walk that proves the DAG is complete: the importer uses it
        for a DAG it has just written under the same write session.
        """
        c = parse_cid(cid)
        with self.write_session():
            if not check:
                pass
            elif recursive:
                for _ in self.walk(c):
                    pass  # raises BlockNotFoundError naming the first missing block
            elif not self.has_digest(c.digest):
                raise BlockNotFoundError(f"cannot pin {c}: it is not in the local store")
            with self._tx() as conn:
                conn.execute(
                    "INSERT INTO pins(digest, codec, version, recursive, pinned_at)"
                    " VALUES (?,?,?,?,?) ON CONFLICT(digest) DO UPDATE SET"
                    " recursive=max(recursive, excluded.recursive)",
                    (c.digest, CODECS[c.codec], c.version, int(recursive), time.time()),
                )

    def unpin(self, cid: str | CID) -> bool:
        c = parse_cid(cid)
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM pins WHERE digest=?", (c.digest,))
            return cur.rowcount > 0

    def pins(self) -> list[dict[str, Any]]:
        rows = self._conn().execute(
            "SELECT digest, codec, version, recursive FROM pins ORDER BY pinned_at"
        ).fetchall()
        return [
            {
                "cid": format_cid(v, _CODE_TO_NAME[code], d),
                "type": "recursive" if rec else "direct",
            }
            for d, code, v, rec in rows
        ]

    def is_pinned(self, cid: str | CID) -> bool:
        row = self._conn().execute(
            "SELECT 1 FROM pins WHERE digest=?", (parse_cid(cid).digest,)
        ).fetchone()
        return row is not None

    def gc(self) -> dict[str, int]:
        """Delete every block not reachable from a root.

        Roots: pins (recursive ones with their DAG), roots still waiting to be pushed to Kubo,
        and every dag-json block (provenance records are the audit log: they and what they
        link to are kept). Runs under the exclusive gc lock, so concurrent adds wait.
        """
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._gc_locked()
        finally:
            os.close(fd)

    def _gc_locked(self) -> dict[str, int]:
        conn = self._conn()
        keep: set[bytes] = set()

        def mark(c: CID) -> None:
            for node in self.walk(c, missing_ok=True):
                keep.add(node.digest)

        for d, code, v, rec in conn.execute(
            "SELECT digest, codec, version, recursive FROM pins"
        ).fetchall():
            c = CID(v, _CODE_TO_NAME[code], d)
            if rec:
                mark(c)
            else:
                keep.add(d)
        for d, code, v in conn.execute("SELECT digest, codec, version FROM pending").fetchall():
            mark(CID(v, _CODE_TO_NAME[code], d))
        for (d,) in conn.execute(
            "SELECT digest FROM blocks WHERE codec=?", (CODECS["dag-json"],)
        ).fetchall():
            mark(CID(1, "dag-json", d))
        doomed: list[tuple[bytes, bool, int]] = []
        for d, is_file, size in conn.execute(
            "SELECT digest, data IS NULL, size FROM blocks"
        ).fetchall():
            if d not in keep:
                doomed.append((d, bool(is_file), int(size)))
        with self._tx() as tx:
            tx.executemany("DELETE FROM blocks WHERE digest=?", [(d,) for d, _, _ in doomed])
        freed = 0
        for d, is_file, size in doomed:
            freed += size
            if is_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.block_path(d))
        tmp_removed = self._remove_stale_tmp()
        return {"removed": len(doomed), "freed_bytes": freed, "kept": len(keep),
                "stale_tmp_removed": tmp_removed}

    def _remove_stale_tmp(self) -> int:
        """Temp files of writers that died mid-write (older than an hour)."""
        now, removed = time.time(), 0
        for shard in self.root.iterdir():
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if entry.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        if now - entry.stat().st_mtime > _TMP_MAX_AGE:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    # -- roots waiting for Kubo (used by BlockService) -------------------------------------------
    def add_pending(self, cid: str | CID, pin: bool) -> None:
        c = parse_cid(cid)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO pending(digest, codec, version, pin, queued_at) VALUES (?,?,?,?,?)"
                " ON CONFLICT(digest) DO UPDATE SET pin=max(pin, excluded.pin)",
                (c.digest, CODECS[c.codec], c.version, int(pin), time.time()),
            )

    def pending(self) -> list[tuple[CID, bool]]:
        rows = self._conn().execute(
            "SELECT digest, codec, version, pin FROM pending ORDER BY queued_at"
        ).fetchall()
        return [(CID(v, _CODE_TO_NAME[code], d), bool(p)) for d, code, v, p in rows]

    def remove_pending(self, cid: str | CID) -> None:
        c = parse_cid(cid)
        with self._tx() as conn:
            conn.execute("DELETE FROM pending WHERE digest=?", (c.digest,))


def _json_links(value: Any, out: list[CID]) -> None:
    """Collect dag-json links (``{"/": "<cid>"}``) anywhere in a decoded record."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get("/"), str):
            with contextlib.suppress(InvalidCIDError):
                out.append(parse_cid(value["/"]))
            return
        for v in value.values():
            _json_links(v, out)
    elif isinstance(value, list):
        for v in value:
            _json_links(v, out)
