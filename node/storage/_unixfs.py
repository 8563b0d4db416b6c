"""UnixFS import (files and folders -> blocks, Kubo-identical CIDs) and export (blocks -> files).

Import matches ``ipfs add`` with Kubo's defaults: fixed 262,144-byte chunks, balanced layout
with at most 174 links per node, CIDv0 with dag-pb UnixFS leaves by default, and for
``cid_version=1`` raw leaves and CIDv1 (``--cid-version=1`` implies ``--raw-leaves``).
Folders are UnixFS directories whose links are sorted by name bytes. A folder whose links Kubo
estimates at more than 256 KiB (the sum of name bytes + binary CID bytes over its entries, e.g.
4,033 names of 31 bytes with CIDv0) becomes a HAMT-sharded directory exactly as Kubo builds it:
fanout 256, murmur3-x64-64 of the name, one byte of the hash per level, a sub-shard wherever two
names share a slot (Kubo's ``Import.UnixFSHAMTDirectory*`` defaults, "links" size estimation).
Hidden files are included and symlinks are followed (``ipfs add -r --hidden
--dereference-symlinks``); a symlink loop or a special file is an error.

Streaming with bounded memory: a file is read with ``readinto`` into a fixed ring of chunk
buffers; hashing and block writes run in a small thread pool (hashlib releases the GIL for
large buffers) while the next chunks are read, so memory is ``in_flight * 256 KiB`` whatever the
file size. Tree nodes are built as soon as 174 siblings exist, so only one partial node per
level is ever held.

Export writes a file with a few threads that share the DAG walk: each reads a block into its
own buffer, checks its hash, and pwrites the bytes at the offset the parent node gives, so
hashing (GIL released) and page-cache writes overlap on both cores. Kubo-framed dag-pb leaves
are sliced, not decoded. Output goes to a temp file renamed into place only when every block
has been verified and written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import mmh3

from node.errors import (
    CorruptBlockError,
    InvalidArgumentError,
    PathNotFoundError,
    StorageError,
    UnsafePathError,
)

from . import _dagpb
from ._cid import CID, CODECS, cid_from_binary
from ._local import INLINE_MAX, LocalBlockStore

CHUNK_SIZE = 262_144
MAX_LINKS = 174
# Kubo's Import.UnixFSHAMTDirectorySizeThreshold: a folder whose estimated size (name bytes +
# binary CID bytes per link) is strictly above this is sharded; at exactly this it stays flat.
HAMT_THRESHOLD = 262_144
HAMT_FANOUT = 256  # Import.UnixFSHAMTDirectoryMaxFanout: one byte of the hash per level
HAMT_HASH_MURMUR3 = 0x22  # multicodec murmur3-x64-64, as UnixFS Data.hashType
# Index rows are committed in batches: one transaction and one fsync per shard directory per
# batch. Bounded by count (file-backed rows are tiny) and by the inline bytes they carry.
_COMMIT_ROWS = 1024
_COMMIT_INLINE_BYTES = 8 << 20
# With batched durability (syncfs) a batch also ends after this many bytes of block files, and
# its syncfs + commit run in the pool while the next batch is read, hashed and written: the
# disk flushes one batch while the CPUs fill the page cache with the next (8 MiB beat 32 and
# 96 MiB in an A/B of 256 MiB adds here).
_COMMIT_FILE_BYTES = 8 << 20
# A one-chunk file smaller than this is hashed by the calling thread, not handed to the pool.
_INLINE_JOB_BYTES = 64 << 10

Row = tuple[bytes, int, int, "bytes | None"]


@dataclass(frozen=True)
class DagNode:
    """A built node as its parent links to it."""

    cid: CID
    tsize: int  # cumulative size of the DAG (Tsize of the link to it)
    filesize: int  # bytes of file content below it (0 for directories)


def _read_full(f: BinaryIO, buf: bytearray) -> int:
    """Fill ``buf`` unless EOF comes first (the chunker cuts at exact 256 KiB boundaries)."""
    mv = memoryview(buf)
    n = 0
    while n < len(buf):
        got = f.readinto(mv[n:])  # type: ignore[attr-defined]
        if not got:
            break
        n += got
    return n


@functools.lru_cache(maxsize=64)
def _leaf_frame(n: int) -> tuple[bytes, bytes]:
    """``file_leaf_parts`` for ``n`` bytes, cached: nearly every leaf is 256 KiB."""
    return _dagpb.file_leaf_parts(n)


class Importer:
    """Adds files and folders into a LocalBlockStore. One instance per add call."""

    def __init__(
        self,
        store: LocalBlockStore,
        pool: ThreadPoolExecutor,
        *,
        cid_version: int = 0,
        in_flight: int = 8,
        progress: Callable[[int], None] | None = None,
        hamt_threshold: int = HAMT_THRESHOLD,
    ) -> None:
        if cid_version not in (0, 1):
            raise InvalidArgumentError(f"cid_version must be 0 or 1, got {cid_version!r}")
        self.store = store
        self.pool = pool
        self.version = cid_version
        self.raw_leaves = cid_version == 1
        self.in_flight = max(2, in_flight)
        self.progress = progress
        self.hamt_threshold = hamt_threshold
        self._rows: list[Row] = []
        self._inline_bytes = 0
        self._file_bytes = 0
        self._commit: Future[None] | None = None  # the batch being synced and committed
        self._buffers: list[bytearray] = []  # free chunk buffers, at most ``in_flight`` made
        self._buffers_made = 0
        self.new_blocks = 0
        self.bytes_read = 0

    # -- blocks -------------------------------------------------------------------------------
    def _queue_row(self, row: Row | None) -> None:
        if row is not None:
            self._rows.append(row)
            if row[3] is not None:
                self._inline_bytes += len(row[3])
            else:
                self._file_bytes += row[2]
        if len(self._rows) >= _COMMIT_ROWS or self._inline_bytes >= _COMMIT_INLINE_BYTES:
            self.flush()
        elif self.store.batch_sync and self._file_bytes >= _COMMIT_FILE_BYTES:
            rows = self._take_rows()
            self.wait()  # batches commit in order, one in flight
            self._commit = self.pool.submit(self.store.index, rows)

    def _take_rows(self) -> list[Row]:
        rows, self._rows = self._rows, []
        self._inline_bytes = self._file_bytes = 0
        return rows

    def flush(self) -> None:
        """Commit every queued index row (after making their files durable)."""
        rows = self._take_rows()
        self.wait()
        self.store.index(rows, self.pool)

    def wait(self) -> None:
        """Wait for the batch committing in the background (raises its error)."""
        commit, self._commit = self._commit, None
        if commit is not None:
            commit.result()

    def _put_small(self, block: bytes, codec: str) -> CID:
        digest = hashlib.sha256(block).digest()
        if len(block) > INLINE_MAX:
            if not self.store.has_file_block(digest):
                self.store.write_file(digest, (block,), batched=True)
                self._queue_row((digest, CODECS[codec], len(block), None))
        else:
            self._queue_row((digest, CODECS[codec], len(block), block))
        version = self.version
        return CID(version, codec, digest)

    def _leaf_job(
        self, buf: bytearray, n: int, fd: int | None, offset: int
    ) -> tuple[bytes, int, Row | None]:
        """(Read,) hash one chunk as a raw or UnixFS leaf, and write it if new. Runs in the pool.

        With ``fd`` the worker reads its own chunk with pread, so reading, hashing and writing
        all run in parallel; the main thread only assembles the tree.
        """
        mv = memoryview(buf)[:n]
        if fd is not None:
            got = 0
            while got < n:
                r = os.preadv(fd, [mv[got:]], offset + got)
                if r == 0:
                    raise InvalidArgumentError(
                        f"the file shrank while it was being added (at byte {offset + got})"
                    )
                got += r
        if self.raw_leaves:
            pieces: tuple[bytes | memoryview, ...] = (mv,)
            code = CODECS["raw"]
        else:
            head, tail = _leaf_frame(n)
            pieces = (head, mv, tail)
            code = CODECS["dag-pb"]
        h = hashlib.sha256()
        for p in pieces:
            h.update(p)
        digest = h.digest()
        size = sum(len(p) for p in pieces)
        if size > INLINE_MAX:
            if self.store.has_file_block(digest):
                return digest, size, None  # dedup: the block is already stored
            self.store.write_file(digest, pieces, batched=True)
            return digest, size, (digest, code, size, None)
        return digest, size, (digest, code, size, b"".join(bytes(p) for p in pieces))

    # -- files --------------------------------------------------------------------------------
    def add_stream(self, f: BinaryIO) -> DagNode:
        """Import a stream read sequentially by this thread (pipes, BytesIO, ...)."""

        def chunks(buf: bytearray) -> tuple[int, int | None, int]:
            return _read_full(f, buf), None, 0

        return self._add_chunks(chunks, None)

    def add_fd(self, fd: int, size: int) -> DagNode:
        """Import ``size`` bytes of a regular file: the workers pread their own chunks."""
        offsets = iter(range(0, max(size, 1), CHUNK_SIZE))

        def chunks(buf: bytearray) -> tuple[int, int | None, int]:
            off = next(offsets, None)
            if off is None:
                return 0, fd, 0
            return min(CHUNK_SIZE, size - off), fd, off

        return self._add_chunks(chunks, size)

    def _add_chunks(
        self, next_chunk: Callable[[bytearray], tuple[int, int | None, int]], size: int | None
    ) -> DagNode:
        levels: list[list[DagNode]] = [[]]
        # Chunk buffers are shared by every file of this import and made on first need, so a
        # folder of small files allocates one buffer, not ``in_flight`` per file.
        free = self._buffers
        jobs: deque[tuple[Future[tuple[bytes, int, Row | None]], bytearray, int]] = deque()
        leaf_codec = "raw" if self.raw_leaves else "dag-pb"

        def finish_oldest() -> None:
            fut, buf, n = jobs.popleft()
            digest, bsize, row = fut.result()
            free.append(buf)
            if row is not None:
                self.new_blocks += 1
            self._queue_row(row)
            self._push(levels, 0, DagNode(CID(self.version, leaf_codec, digest), bsize, n))
            if self.progress is not None:
                self.progress(n)

        try:
            first = True
            while True:
                if not free:
                    if self._buffers_made < self.in_flight:
                        free.append(bytearray(CHUNK_SIZE))
                        self._buffers_made += 1
                    else:
                        finish_oldest()
                buf = free.pop()
                n, fd, offset = next_chunk(buf)
                if n == 0 and not first:
                    free.append(buf)
                    break
                self.bytes_read += n
                if first and n < _INLINE_JOB_BYTES and not jobs:
                    # A small file in one chunk: hashing it here beats a hand-off to the pool.
                    done: Future[tuple[bytes, int, Row | None]] = Future()
                    done.set_result(self._leaf_job(buf, n, fd, offset))
                    jobs.append((done, buf, n))
                    break
                first = False
                jobs.append((self.pool.submit(self._leaf_job, buf, n, fd, offset), buf, n))
                if n < CHUNK_SIZE:
                    break
            while jobs:
                finish_oldest()
        finally:
            for fut, _, _ in jobs:  # an error: let running jobs end before buffers go away
                with contextlib.suppress(Exception):
                    fut.result()
        return self._finish(levels)

    def _push(self, levels: list[list[DagNode]], depth: int, node: DagNode) -> None:
        level = levels[depth]
        level.append(node)
        if len(level) == MAX_LINKS:
            parent = self._parent(level)
            levels[depth] = []
            if depth + 1 == len(levels):
                levels.append([])
            self._push(levels, depth + 1, parent)

    def _finish(self, levels: list[list[DagNode]]) -> DagNode:
        """Close the balanced tree: reduce each level bottom-up into a single root."""
        depth = 0
        while True:
            level = levels[depth]
            higher = any(levels[d] for d in range(depth + 1, len(levels)))
            if len(level) == 1 and not higher:
                return level[0]
            if level:
                parent = self._parent(level)
                levels[depth] = []
                if depth + 1 == len(levels):
                    levels.append([])
                levels[depth + 1].append(parent)
            depth += 1

    def _parent(self, children: list[DagNode]) -> DagNode:
        filesize = sum(c.filesize for c in children)
        data = _dagpb.encode_unixfs(
            _dagpb.UnixFSData(
                _dagpb.FILE, filesize=filesize, blocksizes=[c.filesize for c in children]
            )
        )
        links = [_dagpb.PBLink(c.cid.binary(), "", c.tsize) for c in children]
        block = _dagpb.encode_node(links, data)
        cid = self._put_small(block, "dag-pb")
        return DagNode(cid, len(block) + sum(c.tsize for c in children), filesize)

    def add_file(self, path: Path) -> DagNode:
        try:
            with open(path, "rb", buffering=0) as f:
                st = os.fstat(f.fileno())
                if stat.S_ISREG(st.st_mode):
                    return self.add_fd(f.fileno(), st.st_size)
                return self.add_stream(f)  # type: ignore[arg-type]
        except FileNotFoundError:
            raise PathNotFoundError(f"{path} does not exist") from None
        except IsADirectoryError:
            raise InvalidArgumentError(f"{path} is a directory: use add_directory") from None
        except PermissionError:
            raise PathNotFoundError(f"{path} cannot be read (permission denied)") from None

    # -- folders ------------------------------------------------------------------------------
    def add_directory(self, path: Path, recursive: bool = True) -> DagNode:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise PathNotFoundError(f"{path} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgumentError(f"{path} is not a directory: use add_file")
        return self._add_dir(path, recursive, {(st.st_dev, st.st_ino)})

    def _add_dir(self, path: Path, recursive: bool, ancestors: set[tuple[int, int]]) -> DagNode:
        try:
            entries = list(os.scandir(path))
        except PermissionError:
            raise PathNotFoundError(f"{path} cannot be read (permission denied)") from None
        children: list[tuple[bytes, str, DagNode]] = []
        for entry in entries:
            try:
                name_bytes = entry.name.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgumentError(
                    f"{entry.path!r}: file names must be UTF-8 to be stored in UnixFS"
                ) from None
            try:
                st = os.stat(entry.path)  # follows symlinks (--dereference-symlinks)
            except FileNotFoundError:
                raise PathNotFoundError(f"{entry.path} is a dangling symlink") from None
            if stat.S_ISDIR(st.st_mode):
                if not recursive:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    raise InvalidArgumentError(f"{entry.path} is a symlink loop")
                node = self._add_dir(Path(entry.path), True, ancestors | {key})
            elif stat.S_ISREG(st.st_mode):
                node = self.add_file(Path(entry.path))
            else:
                raise InvalidArgumentError(
                    f"{entry.path} is not a regular file or directory (UnixFS cannot hold it)"
                )
            children.append((name_bytes, entry.name, node))
        children.sort(key=lambda c: c[0])
        estimate = sum(len(name_bytes) + len(n.cid.binary()) for name_bytes, _, n in children)
        if estimate > self.hamt_threshold:
            return self._hamt_shard([(hamt_hash(nb), name, n) for nb, name, n in children], 0)
        links = [_dagpb.PBLink(n.cid.binary(), name, n.tsize) for _, name, n in children]
        block = _dagpb.encode_node(links, _dagpb.encode_unixfs(_dagpb.UnixFSData(_dagpb.DIRECTORY)))
        cid = self._put_small(block, "dag-pb")
        return DagNode(cid, len(block) + sum(n.tsize for _, _, n in children), 0)

    def _hamt_shard(self, children: list[tuple[bytes, str, DagNode]], depth: int) -> DagNode:
        """One HAMT node over ``children`` -- (name hash, name, node) -- at ``depth`` (its
        sub-shards are written first).

        Byte ``depth`` of a name's hash picks its slot. A slot with one entry links to it as
        ``"%02X" % slot + name``; a slot two or more names share links to a sub-shard, named
        by the slot alone. The Data field carries the occupied slots as a big-endian bitfield
        without leading zero bytes (go-bitfield's ``Bytes()``).
        """
        slots: dict[int, list[tuple[bytes, str, DagNode]]] = {}
        for child in children:
            digest = child[0]
            if depth >= len(digest):  # 64 equal hash bits: Kubo refuses this folder too
                raise StorageError(
                    f"names {[c[1] for c in children]!r} collide in all 64 bits of the HAMT "
                    "hash; rename one of them"
                )
            slots.setdefault(digest[depth], []).append(child)
        links: list[_dagpb.PBLink] = []
        bitfield = 0
        for slot in sorted(slots):
            bitfield |= 1 << slot
            group = slots[slot]
            if len(group) == 1:
                _, name, node = group[0]
                links.append(_dagpb.PBLink(node.cid.binary(), f"{slot:02X}{name}", node.tsize))
            else:
                node = self._hamt_shard(group, depth + 1)
                links.append(_dagpb.PBLink(node.cid.binary(), f"{slot:02X}", node.tsize))
        data = _dagpb.UnixFSData(
            _dagpb.HAMT_SHARD,
            data=bitfield.to_bytes(HAMT_FANOUT // 8, "big").lstrip(b"\0"),
            hash_type=HAMT_HASH_MURMUR3,
            fanout=HAMT_FANOUT,
        )
        block = _dagpb.encode_node(links, _dagpb.encode_unixfs(data))
        cid = self._put_small(block, "dag-pb")
        return DagNode(cid, len(block) + sum(lk.tsize or 0 for lk in links), 0)


def hamt_hash(name: bytes) -> bytes:
    """The 8 hash bytes a HAMT consumes for ``name``: murmur3-x64-128's first 64-bit half,
    big-endian (go's ``murmur3.New64().Sum()``; the js importer reverses the same 8 bytes)."""
    return mmh3.hash_bytes(name)[7::-1]


# ---------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class Entry:
    name: str
    cid: CID
    tsize: int | None


@dataclass(frozen=True)
class NodeInfo:
    """What a root block is: its UnixFS type and the file size (or DAG size for folders)."""

    type: str  # "file", "directory", "symlink", "hamt-sharded-directory"
    size: int


GetBlock = Callable[[CID], bytes]
ReadInto = Callable[[CID, bytearray], memoryview]


def _decode(c: CID, block: bytes) -> tuple[_dagpb.PBNode, _dagpb.UnixFSData]:
    try:
        node = _dagpb.decode_node(block)
        if node.data is None:
            raise _dagpb.DecodeError("dag-pb node has no UnixFS Data")
        return node, _dagpb.decode_unixfs(node.data)
    except _dagpb.DecodeError as exc:
        raise StorageError(f"{c} is not a UnixFS node: {exc}") from None


def node_info(c: CID, block: bytes) -> NodeInfo:
    if c.codec == "raw":
        return NodeInfo("file", len(block))
    if c.codec != "dag-pb":
        return NodeInfo(c.codec, len(block))
    node, u = _decode(c, block)
    if u.type in (_dagpb.FILE, _dagpb.RAW):
        size = u.filesize if u.filesize is not None else len(u.data or b"")
        return NodeInfo("file", size)
    if u.type in (_dagpb.DIRECTORY, _dagpb.HAMT_SHARD):
        return NodeInfo("directory", len(block) + sum(lk.tsize or 0 for lk in node.links))
    if u.type == _dagpb.SYMLINK:
        return NodeInfo("symlink", len(u.data or b""))
    return NodeInfo(_dagpb.TYPE_NAMES[u.type], 0)


def iter_directory(c: CID, get_block: GetBlock) -> Iterator[Entry]:
    """Entries of a UnixFS directory (plain or HAMT-sharded, as Kubo writes big folders)."""
    if c.codec != "dag-pb":
        raise InvalidArgumentError(f"{c} is a {c.codec} block, not a UnixFS directory")
    node, u = _decode(c, get_block(c))
    if u.type == _dagpb.DIRECTORY:
        for link in node.links:
            yield Entry(link.name or "", _link_cid(c, link), link.tsize)
    elif u.type == _dagpb.HAMT_SHARD:
        yield from _iter_hamt(c, node, u, get_block)
    else:
        raise InvalidArgumentError(f"{c} is a UnixFS {_dagpb.TYPE_NAMES[u.type]}, not a directory")


def _iter_hamt(
    c: CID, node: _dagpb.PBNode, u: _dagpb.UnixFSData, get_block: GetBlock
) -> Iterator[Entry]:
    pad = len(format((u.fanout or 256) - 1, "X"))
    for link in node.links:
        name = link.name or ""
        child = _link_cid(c, link)
        if len(name) == pad:  # a sub-shard
            sub, su = _decode(child, get_block(child))
            if su.type != _dagpb.HAMT_SHARD:
                raise StorageError(f"{child}: HAMT sub-shard link to a non-shard node")
            yield from _iter_hamt(child, sub, su, get_block)
        else:
            yield Entry(name[pad:], child, link.tsize)


def _link_cid(parent: CID, link: _dagpb.PBLink) -> CID:
    try:
        return cid_from_binary(link.hash)
    except Exception as exc:
        raise StorageError(f"{parent} links to an unsupported CID ({exc})") from None


def check_name(name: str, parent: CID) -> str:
    """A directory entry name must be one plain path component."""
    if name in ("", ".", "..") or "/" in name or "\x00" in name or "\\" in name:
        raise UnsafePathError(
            f"directory {parent} contains the entry name {name!r}, which would write outside "
            "the destination; refusing to export it"
        )
    return name


def file_node(
    c: CID, block: bytes | memoryview, expect: int | None
) -> tuple[memoryview, list[tuple[CID, int]]]:
    """Split one (verified) file block into its own bytes and its children with their sizes.

    ``expect`` is the size the parent declared for this subtree; a DAG whose blocks are each
    valid but whose sizes lie is refused rather than written with holes or overlaps.
    """
    if c.codec == "raw":
        data = memoryview(block)
        if expect is not None and len(data) != expect:
            raise CorruptBlockError(str(c), f"holds {len(data)} bytes, parent says {expect}")
        return data, []
    if c.codec != "dag-pb":
        raise InvalidArgumentError(f"{c} is a {c.codec} block, not a UnixFS file")
    node, u = _decode(c, block)
    if u.type not in (_dagpb.FILE, _dagpb.RAW):
        what = _dagpb.TYPE_NAMES[u.type]
        raise InvalidArgumentError(f"{c} is a UnixFS {what}, not a file")
    data = memoryview(u.data if u.data is not None else b"")
    if len(u.blocksizes) != len(node.links):
        raise StorageError(f"{c}: {len(node.links)} links but {len(u.blocksizes)} block sizes")
    total = len(data) + sum(u.blocksizes)
    if expect is not None and total != expect:
        raise CorruptBlockError(str(c), f"holds {total} bytes, parent says {expect}")
    children = [
        (_link_cid(c, link), size) for link, size in zip(node.links, u.blocksizes, strict=True)
    ]
    return data, children


def _leaf_data(c: CID, block: memoryview, expect: int | None) -> memoryview | None:
    """The file bytes of a leaf, sliced out without decoding; None when not a plain leaf.

    Raw leaves are their bytes. A dag-pb leaf as Kubo writes it is a fixed header, the bytes
    and a fixed trailer (``file_leaf_parts``): when ``block`` is exactly that frame around
    ``expect`` bytes, decoding it would give the same answer; anything else is decoded.
    """
    if c.codec == "raw":
        if expect is not None and len(block) != expect:
            raise CorruptBlockError(str(c), f"holds {len(block)} bytes, parent says {expect}")
        return block
    if expect is None or c.codec != "dag-pb":
        return None
    head, tail = _leaf_frame(expect)
    h, t = len(head), len(tail)
    if (
        len(block) != h + expect + t
        or block[:h] != head
        or block[h + expect :] != tail
    ):
        return None
    return block[h : h + expect]


class _Walk:
    """The blocks still to visit in one file export, shared by the threads writing it."""

    def __init__(self, todo: list[tuple[CID, int, int | None]]) -> None:
        self.todo = todo  # a stack: children are pushed in reverse, so popped in order
        self.busy = 0
        self.error: BaseException | None = None
        self.cond = threading.Condition(threading.Lock())

    def take(self) -> tuple[CID, int, int | None] | None:
        """The next block, or None when all are done (or one failed)."""
        with self.cond:
            while not self.todo and self.busy and self.error is None:
                self.cond.wait()  # a busy thread may still push children
            if self.error is not None or not self.todo:
                return None
            self.busy += 1
            return self.todo.pop()

    def done(self, children: list[tuple[CID, int, int]]) -> None:
        with self.cond:
            self.busy -= 1
            self.todo.extend(reversed(children))  # type: ignore[arg-type]
            if children or not self.busy:
                self.cond.notify_all()

    def fail(self, exc: BaseException, *, busy: bool = True) -> None:
        """Stop every thread; ``busy``: the caller held a block from ``take``."""
        with self.cond:
            self.busy -= busy
            if self.error is None:
                self.error = exc
            self.cond.notify_all()


def iter_file(c: CID, get_block: GetBlock) -> Iterator[memoryview]:
    """The bytes of a UnixFS file, in order, block by block."""
    stack: list[tuple[CID, int | None]] = [(c, None)]
    while stack:
        cid, expect = stack.pop()
        data, children = file_node(cid, get_block(cid), expect)
        if len(data):
            yield data
        stack.extend(reversed(children))


class Exporter:
    """Writes UnixFS files and folders out of blocks, never outside ``dest``."""

    def __init__(
        self,
        get_block: GetBlock,
        read_into: ReadInto,
        pool: ThreadPoolExecutor,
        *,
        in_flight: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.get_block = get_block
        self.read_into = read_into
        self.pool = pool
        self.in_flight = max(2, in_flight)
        self.progress = progress

    def _node_job(
        self, c: CID, offset: int, expect: int | None, buf: bytearray, fd: int,
        write_lock: threading.Lock,
    ) -> list[tuple[CID, int, int]]:
        """Read, verify and write one block; returns its children with their offsets."""
        view = self.read_into(c, buf)  # verified against the CID
        data = _leaf_data(c, view, expect)
        children: list[tuple[CID, int]] = []
        if data is None:
            data, children = file_node(c, view, expect)
        n, written = len(data), 0
        # Buffered writes to one file serialise on its inode lock anyway, and kernel waiters
        # spin for it; waiting here sleeps instead, leaving the core to another thread's hash.
        with write_lock:
            while written < n:
                written += os.pwrite(fd, data[written:], offset + written)
        del data, view  # release ``buf`` before it is reused (it may need to grow)
        if self.progress is not None and n:
            self.progress(n)
        out, pos = [], offset + n
        for child, size in children:
            out.append((child, pos, size))
            pos += size
        return out

    def write_file_fd(self, c: CID, fd: int, size: int) -> None:
        """Write the file ``c`` (``size`` bytes) into ``fd``; every block is verified first.

        A few threads (this one plus up to ``in_flight - 1`` from the pool) share a stack of
        blocks still to visit; each reads a block into its own buffer, hashes it (hashlib
        drops the GIL), and pwrites its bytes at the offset the parent gave it, so hashing and
        writing overlap and memory stays at one block buffer per thread. The stack is worked
        depth first, which bounds it by 174 x depth. The first error stops every thread.
        """
        os.ftruncate(fd, size)
        walk = _Walk([(c, 0, size)])
        write_lock = threading.Lock()

        def work() -> None:
            buf = bytearray(min(size, CHUNK_SIZE) + 1024)  # read_into grows it if need be
            while (item := walk.take()) is not None:
                try:
                    children = self._node_job(item[0], item[1], item[2], buf, fd, write_lock)
                except BaseException as exc:
                    walk.fail(exc)
                    return
                walk.done(children)

        # One block (Kubo's files up to 256 KiB): no helpers to start and wait for.
        helpers = [self.pool.submit(work) for _ in range(self.in_flight - 1)] if (
            size > CHUNK_SIZE) else []
        try:
            work()  # this thread works too: progress never depends on a free pool thread
        except BaseException as exc:  # e.g. KeyboardInterrupt while waiting: stop the helpers
            walk.fail(exc, busy=False)
            raise
        finally:
            for fut in helpers:  # helpers the pool has not started yet are not waited for
                if not fut.cancel():
                    with contextlib.suppress(Exception):
                        fut.result()
        if walk.error is not None:
            raise walk.error

    def export(self, c: CID, dest: Path) -> None:
        block = self.get_block(c)
        info = node_info(c, block)
        if info.type == "directory":
            self._export_dir(c, dest)
        elif info.type == "file":
            self._export_file(c, dest, info.size)
        elif info.type == "symlink":
            self._export_symlink(c, block, dest)
        else:
            raise InvalidArgumentError(f"{c} is a {info.type}, which cannot be written to a file")

    def _export_file(self, c: CID, dest: Path, size: int) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{os.getpid()}.{threading.get_ident()}.dsi-part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            self.write_file_fd(c, fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        if dest.is_symlink():
            dest.unlink()  # never write through a link: replace it
        os.replace(tmp, dest)

    def _export_symlink(self, c: CID, block: bytes, dest: Path) -> None:
        _, u = _decode(c, block)
        target = bytes(u.data or b"").decode("utf-8", "replace")
        parts = target.split("/")
        if target.startswith("/") or ".." in parts or "\x00" in target:
            raise UnsafePathError(
                f"symlink {c} points to {target!r}, outside the destination; refusing it"
            )
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        os.symlink(target, dest)

    def _export_dir(self, c: CID, dest: Path) -> None:
        if dest.is_symlink():
            raise UnsafePathError(f"{dest} is a symlink; refusing to write a folder through it")
        if dest.exists() and not dest.is_dir():
            raise InvalidArgumentError(f"{dest} exists and is not a folder; cannot write {c} there")
        dest.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        for entry in iter_directory(c, self.get_block):
            name = check_name(entry.name, c)
            if name in seen:
                raise UnsafePathError(f"directory {c} lists the name {name!r} twice")
            seen.add(name)
            self.export(entry.cid, dest / name)
