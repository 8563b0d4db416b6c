"""``ProvenanceStore``: the signed, hash-chained record log of one node and its SQLite index.

Writing one record (``append``) -- the order is what makes it crash-safe and fork-free:

1. validate and encode the caller's fields, store split-out large values as blocks (no lock);
2. under the writer lock (thread lock + ``flock``, shared by every process on this cache_dir)
   find this node's head -- the last journal entry, else the highest ``seq`` in the index --
   build ``seq = head.seq + 1``, ``prev = head.cid``, ``ts = max(now, head.ts)``, sign, and
   append the record to the journal with one ``write()`` (``_journal``): from here it
   survives SIGKILL, and the next writer (any thread or process) chains on it;
3. when Kubo answers, put the block now (local + Kubo) and return ``(cid, True)``; otherwise
   return ``(cid, False)``: the block goes to the local store with the next catch-up.

``catch_up`` moves journal entries into SQLite (record rows with the exact block bytes, and
the postings that answer filters) and into the local block store (one transaction), then
empties the journal once it holds nothing else. It runs in a background thread beside the
appends (woken every ``BATCH`` records, at the latest after ``FLUSH_AFTER`` seconds; an
appender that gets ``MAX_BEHIND`` records ahead waits until the indexer takes them, which
bounds memory), and first thing in every query,
lineage, verify, count, get and close -- in whichever process gets there first. So a record
is queryable from any process as soon as its call returned, and the caller pays a ``write()``
instead of an SQLite transaction (~150-250 us here). Replays are harmless (rows and blocks
are content-addressed and inserted idempotently), so a crash at any point loses nothing
that was acknowledged, and no fork can happen: a record is chained only onto a journal entry
or an index row that already exists.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from node._writer_lock import WriterLock
from node.config import datasets_enabled_mode
from node.errors import (
    BlockNotFoundError,
    CorruptBlockError,
    DatasetsError,
    InvalidArgumentError,
    KuboUnavailableError,
    NotFoundError,
    ProvenanceError,
    StorageError,
    VerificationError,
)
from node.identity import verify_signature
from node.storage import CODECS, INLINE_MAX

from . import _journal, _prov
from ._dagjson import (
    RECORD_CID_PREFIX,
    DecodeError,
    Link,
    cid_digest,
    cid_for,
    decode,
    decode_canonical,
    dumps_list,
)
from ._records import (
    LINK_FIELDS,
    RESERVED,
    build_record,
    cid_key,
    data_filter,
    filter_key,
    index_value,
    link_keys,
    postings_of,
    prepare,
    signing_message,
)
from ._schema import DDL, SCHEMA_VERSION, connect

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.identity import Identity

log = logging.getLogger(__name__)
_sha256 = hashlib.sha256
_DAG_JSON_CODE = CODECS["dag-json"]

# A filter that matches more postings than this is "large"; the smallest one drives the query.
_COUNT_CAP = 256
# The appender catches up (postings + blocks) once this many records are unindexed.
BATCH = 256
ABSORB_CHUNK = 2048  # entries turned into rows at a time
# Backpressure: an appender this far ahead of the indexer waits until the indexer takes the
# records (at most ``TAKE_TIMEOUT``, then it catches up itself). Records waiting to be indexed
# are held in memory, so this bounds memory; bigger batches write fewer B-tree pages per record.
MAX_BEHIND = 16 * BATCH
TAKE_TIMEOUT = 10.0
# Journal size past which catch-up empties it even while appends keep coming.
ROTATE_AT = 16 << 20
CATCH_UP_CHUNK = 2000
# ... and a background thread does it for records older than this many seconds.
FLUSH_AFTER = 0.5
# json_each batches need SQLite's JSON functions (built in since 3.38).
_JSON_BATCH = sqlite3.sqlite_version_info >= (3, 38, 0)
_JSON_RECORDS = 512  # records per postings statement (~4,000 postings)
_RECORD_COLUMNS = {"node": "node", "seq": "seq", "cid": "cid", "ts": "ts", "prev": "prev"}
_REQUIRED = {"type": str, "ts": int, "node": str, "seq": int, "sig": bytes}



def _postings_json(record_type: str, postings: list[tuple[str, str]]) -> str:
    """A record's index postings, ``type`` first, as compact JSON ``[[key, value], ...]``."""
    return dumps_list([("type", index_value(record_type)), *postings])

class _OldSchema(Exception):
    """The index file was written by an older dsi: it is rebuilt from the blocks."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _to_ms(value: Any, name: str) -> int | None:
    """``since``/``until``: an aware datetime, or unix seconds (like ``time.time()``)."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise InvalidArgumentError(f"{name} is a naive datetime; give it a timezone")
        return int(value.timestamp() * 1000)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1000)
    raise InvalidArgumentError(
        f"{name} must be a timezone-aware datetime or unix seconds, got {value!r}"
    )


def _check_limit(limit: int | None) -> int:
    if limit is None:
        return -1  # SQLite: no limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgumentError(f"limit must be a positive integer or None, got {limit!r}")
    return limit


class ProvenanceStore:
    """Signed records of this node, chained by ``prev``, indexed in SQLite. Thread-safe and
    safe for several processes sharing one ``cache_dir`` (see the module docstring)."""

    def __init__(self, cfg: NodeConfig, identity: Identity, blocks: Any) -> None:
        self._cfg = cfg
        self._identity = identity
        self._node = identity.peer_id
        self._sign = identity.signer().sign
        self._blocks = blocks
        self._local = getattr(blocks, "local", None)
        self._db_path = cfg.provenance_db
        self._ipfs_off = datasets_enabled_mode() == "off"
        cfg.ensure_dirs()
        self._wlock = threading.Lock()
        self._flock = WriterLock(self._db_path)
        self._tls = threading.local()
        self._fresh: dict[tuple[int, int], tuple[str, int, Any]] = {}
        self._unindexed = 0
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._taken = threading.Condition()  # notified when the indexer takes a batch
        self._catch_lock = threading.Lock()  # one catch-up at a time in this process
        self._index_flock = WriterLock(self._db_path.with_name(self._db_path.name + ".index"))
        self._absorbed: tuple[int, int] = (-1, 0)  # (generation, offset) known to be indexed
        self._in_kubo: set[str] = set()
        self._kubo_behind = False
        self._head_cache: tuple[int, int, tuple[int, str | None, int]] | None = None
        self._head_gen = 0
        self._head_size = 0  # journal size when the head was found (writer lock held)
        self._journal = _journal.Journal(
            self._db_path.with_name(self._db_path.name + ".journal")
        )
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._writer = self._open_writer()
        self._indexer = connect(self._db_path)  # used only under _catch_lock
        with self._conns_lock:
            self._conns.append(self._indexer)
        self.repair()  # entries a killed writer logged but did not index yet

    # ------------------------------------------------------------------ connections, schema
    def _open_writer(self) -> sqlite3.Connection:
        try:
            conn = connect(self._db_path)
            self._init(conn)
        except (sqlite3.DatabaseError, _OldSchema) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and (
                "not a database" not in str(exc) and "malformed" not in str(exc)
            ):
                raise StorageError(f"provenance index {self._db_path}: {exc}") from exc
            # The index is only a cache of the blocks: move the old file aside, rebuild.
            with contextlib.suppress(NameError, sqlite3.Error):
                conn.close()
            stamp = time.strftime("%Y%m%dT%H%M%S")
            log.warning("provenance index %s: %s; rebuilding it from the record blocks (the old "
                        "file is kept beside it and can be deleted)", self._db_path, exc)
            self._flock.acquire()  # one process moves it; the others then find the new file
            try:
                if not self._fresh_schema():
                    for suffix in ("", "-wal", "-shm"):
                        p = self._db_path.with_name(self._db_path.name + suffix)
                        if p.exists():
                            p.rename(p.with_name(f"{p.name}.old-{stamp}"))
            finally:
                self._flock.release()
            conn = connect(self._db_path)
            self._init(conn)
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _fresh_schema(self) -> bool:
        """Does the file at the index path now hold this schema (another process rebuilt it)?"""
        try:
            with contextlib.closing(sqlite3.connect(str(self._db_path), timeout=120)) as conn:
                row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except sqlite3.DatabaseError:
            return False
        return row is not None and int(row[0]) == SCHEMA_VERSION

    def _init(self, conn: sqlite3.Connection) -> None:
        with self._write_txn(conn):
            for statement in _statements(DDL):
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) < SCHEMA_VERSION:
                raise _OldSchema(f"index schema {row[0]} is older than this dsi's "
                                 f"{SCHEMA_VERSION}")
            elif int(row[0]) != SCHEMA_VERSION:
                raise StorageError(
                    f"{self._db_path} has provenance index schema {row[0]}, this dsi expects "
                    f"{SCHEMA_VERSION}; delete the file and it will be rebuilt from the blocks"
                )
            built = conn.execute("SELECT value FROM meta WHERE key='complete'").fetchone()
            if built is None:
                # New or lost index: whatever records the block store holds are indexed now.
                self._rebuild_locked(conn)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('complete', '1')")

    class _Txn:
        def __init__(self, store: ProvenanceStore, conn: sqlite3.Connection) -> None:
            self.store, self.conn = store, conn

        def __enter__(self) -> sqlite3.Connection:
            self.store._wlock.acquire()
            try:
                self.store._flock.acquire()
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    self.store._flock.release()
                    raise
            except BaseException:
                self.store._wlock.release()
                raise
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                if exc_type is None:
                    self.conn.execute("COMMIT")
                else:
                    self.conn.execute("ROLLBACK")
            finally:
                self.store._flock.release()
                self.store._wlock.release()

    def _write_txn(self, conn: sqlite3.Connection | None = None) -> ProvenanceStore._Txn:
        return ProvenanceStore._Txn(self, conn or self._writer)

    def _reader(self) -> sqlite3.Connection:
        """One read connection per thread (SQLite readers never block the WAL writer)."""
        if self._closed:
            raise ProvenanceError("the provenance store is closed")
        conn = getattr(self._tls, "conn", None)
        if conn is None:
            conn = connect(self._db_path)
            self._tls.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    # ------------------------------------------------------------------------------ writing
    @property
    def node(self) -> str:
        return self._node

    def append(
        self,
        record_type: str,
        fields: Mapping[str, Any] | None = None,
        *,
        input_cid: Any = None,
        output_cid: Any = None,
    ) -> tuple[str, bool]:
        """Sign, chain and durably log one record: ``(record cid, reached_kubo)``.

        ``fields`` are the caller's top-level fields (e.g. ``{"model": ..., "data": {...}}``);
        ``input_cid``/``output_cid`` are a CID string or a list of them (stored as links).
        """
        if self._closed:
            raise ProvenanceError("the provenance store is closed")
        prepared = prepare(record_type, fields, input_cid, output_cid)
        for _, value_block in prepared.blocks:
            self._blocks.put_block(value_block, codec="dag-json")
        with self._wlock:
            self._flock.acquire()
            try:
                seq, prev, head_ts = self._head_locked()
                ts = max(_now_ms(), head_ts)
                cid, data = build_record(
                    prepared, node=self._node, seq=seq, ts=ts, prev=prev, sign=self._sign
                )
                size = self._journal.append(data, self._head_size)  # survives SIGKILL now
                gen = self._head_gen
                self._head_cache = (gen, size, (seq + 1, cid, ts))
            finally:
                self._flock.release()
            # What catch_up needs, computed here once instead of re-decoding the entry.
            inputs = [k for _, k in prepared.inputs]
            outputs = [k for _, k in prepared.outputs]
            row = (cid, self._node, seq, prepared.record_type, ts, prev,
                   json.dumps(inputs) if inputs else None,
                   json.dumps(outputs) if outputs else None)
            # Postings as JSON text (~150 bytes), not a list of tuples (~1 KB): a lagging
            # indexer can hold thousands of these, and they set the memory high-water mark.
            self._fresh[(gen, size)] = (
                cid, hash(data), (row, _postings_json(prepared.record_type, prepared.postings))
            )
            self._unindexed += 1
            behind = self._unindexed
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="dsi-provenance-flush", daemon=True
                )
                self._flusher.start()
        reached = False
        if self._kubo_up():
            # Logged; now the block, so the caller learns whether Kubo has it. A crash here
            # is harmless: catch_up stores the block from the journal.
            put_cid, reached = self._blocks.put_block(data, codec="dag-json")
            if put_cid != cid:
                raise StorageError(f"block store returned CID {put_cid} for record {cid}")
            if reached:
                self._in_kubo.add(cid)
                if self._kubo_behind:
                    # Kubo is back after an outage: push a few old records per append.
                    self._kubo_behind = self.sync(limit=16)["remaining"] > 0
        if behind >= MAX_BEHIND:
            self._wait_for_indexer()
        elif behind >= BATCH:
            self._wake.set()
        return cid, bool(reached)

    def _wait_for_indexer(self) -> None:
        """Backpressure, when the indexer is ``MAX_BEHIND`` records behind: wait until it takes
        them (it is busy with the previous batch), so appends and indexing still overlap while
        memory stays bounded. If it does not take them in time, catch up here."""
        self._wake.set()
        with self._taken:
            if self._taken.wait_for(
                lambda: self._unindexed < MAX_BEHIND or self._stop.is_set(), timeout=TAKE_TIMEOUT
            ):
                return
        self.catch_up()

    def _taken_all(self) -> None:
        """A snapshot took every unindexed record: release appenders waiting on the indexer."""
        with self._taken:
            self._unindexed = 0
            self._taken.notify_all()

    def _head_locked(self) -> tuple[int, str | None, int]:
        """``(next seq, prev cid, head ts)`` of this node. Caller holds the writer lock.

        Fast path: nobody wrote since our last append (same journal generation and size), so
        the cached head is current. Otherwise the head is the last journal entry, or, with an
        empty journal, the highest seq in the index.
        """
        gen, size = self._journal.generation(), self._journal.size()
        self._head_gen = gen
        cached = self._head_cache
        if cached is not None and cached[0] == gen and cached[1] == size:
            self._head_size = size
            return cached[2]
        gen, _ = self._journal_state_locked()
        # Another writer appended since our last look: read only what it added.
        start = cached[1] if cached is not None and cached[0] == gen and cached[1] <= size else (
            _journal.HEADER)
        entries, valid_end = self._journal.read(start, self._journal.size())
        if valid_end < self._journal.size():
            log.warning("provenance journal: cutting a torn tail at offset %d", valid_end)
            self._journal.truncate(valid_end)
        head: tuple[int, str | None, int]
        if not entries and cached is not None and start > _journal.HEADER:
            head = cached[2]  # nothing new after all (e.g. a torn tail was cut)
        elif entries:
            last = decode(entries[-1][1])
            head = (int(last["seq"]) + 1, cid_for(entries[-1][1]), int(last["ts"]))
        else:
            row = self._writer.execute(
                "SELECT seq, cid, ts FROM records WHERE node=? ORDER BY seq DESC LIMIT 1",
                (self._node,),
            ).fetchone()
            head = (0, None, 0) if row is None else (row[0] + 1, row[1], row[2])
        self._head_cache = (gen, valid_end, head)
        self._head_gen = gen
        self._head_size = valid_end
        return head

    def _journal_state_locked(self) -> tuple[int, int]:
        """``(journal generation, offset where unabsorbed entries start)``; repairs the one
        crash state rotation can leave. Caller holds the writer lock."""
        self._journal.ensure_header()
        gen, size = self._journal.generation(), self._journal.size()
        meta_gen, meta_off = _journal_mark(self._writer)
        if gen == meta_gen and size < meta_off:
            # Rotation truncated the file but died before bumping the generation: every entry
            # of this generation is in the index. Finish the rotation.
            gen += 1
            self._journal.rotate(gen)
            return gen, _journal.HEADER
        if gen == meta_gen:
            return gen, max(meta_off, _journal.HEADER)
        return gen, _journal.HEADER  # a generation the index has not seen: all of it is new

    def _flush_loop(self) -> None:
        """The indexer: woken every ``BATCH`` records by the appender (and at the latest after
        ``FLUSH_AFTER`` for a lone record), it runs ``catch_up`` beside the appends."""
        while not self._stop.is_set():
            self._wake.wait(FLUSH_AFTER)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._unindexed:
                try:
                    self.catch_up()
                except Exception as exc:  # keep flushing; the next append/query retries too
                    if self._closed:
                        return
                    log.warning("provenance background catch-up failed: %s", exc)

    def _kubo_up(self) -> bool:
        if self._ipfs_off:
            return False  # IPFS_DATASETS_ENABLED=0: local only, Kubo is never asked
        probe = getattr(self._blocks, "kubo_available", None)
        try:
            return bool(probe()) if probe is not None else False
        except Exception:  # a probe failure means "not available", never a failed append
            return False

    @staticmethod
    def _present(
        conn: sqlite3.Connection, rows: list[tuple[Any, ...]]
    ) -> dict[tuple[str, int], str]:
        """``{(node, seq): cid}`` of these rows already in the index. Looked up by chain
        position: one range scan per node at the end of the ``(node, seq)`` index, where a
        lookup by CID costs a random B-tree read per record."""
        seqs: dict[str, list[int]] = {}
        for row in rows:
            seqs.setdefault(row[1], []).append(row[2])
        present: dict[tuple[str, int], str] = {}
        for node, node_seqs in seqs.items():
            for seq, cid in conn.execute(
                "SELECT seq, cid FROM records WHERE node=? AND seq BETWEEN ? AND ?",
                (node, min(node_seqs), max(node_seqs)),
            ):
                present[(node, seq)] = cid
        return present

    def _index_records(
        self, conn: sqlite3.Connection, items: list[tuple[str, bytes, Any]]
    ) -> list[tuple[int, str]]:
        """Insert record rows and postings for ``(cid, bytes, postings or None)``, in order.

        Rows already present (a journal replayed after a crash) are skipped. Ids are assigned
        here so that rows and postings go in with one ``executemany`` each.
        """
        built: list[tuple[tuple[Any, ...], bytes, str]] = []  # (row, bytes, postings JSON)
        for cid, data, known in items:
            if known is not None:  # appended by this process: row and postings precomputed
                row, record_postings = known
            else:
                record = decode(data)
                prev = record.get("prev")
                inputs = link_keys(record.get("input_cid"))
                outputs = link_keys(record.get("output_cid"))
                row = (cid, record["node"], record["seq"], record["type"], int(record["ts"]),
                       None if prev is None else str(prev),
                       json.dumps(inputs) if inputs else None,
                       json.dumps(outputs) if outputs else None)
                record_postings = _postings_json(row[3], postings_of(record))
            built.append((row, data, record_postings))
        present = self._present(conn, [b[0] for b in built])
        rid = conn.execute("SELECT coalesce(max(id), 0) FROM records").fetchone()[0]
        rows: list[tuple[Any, ...]] = []
        postings: list[str] = []  # per record: [id, ts, [[key, value], ...]] as JSON text
        for row, data, record_postings in built:
            held = present.get((row[1], row[2]))
            if held is not None:
                if held != row[0]:
                    raise ProvenanceError(
                        f"fork: {row[1]} seq {row[2]} is both {held} and {row[0]}; nothing was "
                        "indexed -- run verify() and keep the chain that checks out"
                    )
                continue
            present[(row[1], row[2])] = row[0]
            rid += 1
            rows.append((rid, *row, data))
            postings.append(f"[{rid},{row[4]},{record_postings}]")
        conn.executemany(
            "INSERT INTO records (id, cid, node, seq, type, ts, prev, input_cid, output_cid,"
            " body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        if _JSON_BATCH:
            # One statement per slice instead of one step per posting (~8 a record): SQLite
            # runs it without the GIL, so appends in other threads go on meanwhile. In
            # slices, so the JSON text and SQLite's parse of it stay small (peak memory).
            for i in range(0, len(postings), _JSON_RECORDS):
                conn.execute(
                    "INSERT OR IGNORE INTO postings SELECT json_extract(p.value, '$[0]'),"
                    " json_extract(p.value, '$[1]'), json_extract(r.value, '$[1]'),"
                    " json_extract(r.value, '$[0]')"
                    " FROM json_each(?) AS r, json_each(r.value, '$[2]') AS p",
                    ("[" + ",".join(postings[i : i + _JSON_RECORDS]) + "]",),
                )
        else:
            conn.executemany(
                "INSERT OR IGNORE INTO postings VALUES (?, ?, ?, ?)",
                [(k, v, ts, rid) for rid, ts, pairs in map(json.loads, postings)
                 for k, v in pairs],
            )
        return [(r[0], r[1]) for r in rows]

    def catch_up(self) -> int:
        """Move journal entries (of any process) into the index and the block store.

        Three steps, so that appends go on while SQLite works (on another core: sqlite3
        releases the GIL): a snapshot of the unabsorbed entries under the writer lock (a
        ``pread``), then blocks and index rows outside it, then, when the journal holds
        nothing else (or has grown past ``ROTATE_AT``), emptying it under the lock again.
        Idempotent and safe against other processes doing the same: the index transaction
        re-reads the ``journal`` watermark and skips what another catch-up absorbed.
        Returns how many records were newly indexed.
        """
        if self._closed:
            raise ProvenanceError("the provenance store is closed")
        if self._journal_absorbed():
            return 0
        with self._catch_lock:
            gen, valid_end, items = self._snapshot()
            n = self._absorb(gen, valid_end, items) if items else 0
            n += self._maybe_rotate(gen, valid_end)
        return n

    def _snapshot(self) -> tuple[int, int, list[tuple[int, bytes]]]:
        """``(generation, end offset, entries)`` not yet absorbed, as ``(end offset, bytes)``."""
        with self._wlock:
            self._flock.acquire()
            try:
                gen, start = self._journal_state_locked()
                size = self._journal.size()
                entries, valid_end = self._journal.read(start, size)
                if valid_end < size:
                    log.warning("provenance journal: cutting a torn tail at offset %d", valid_end)
                    self._journal.truncate(valid_end)
                self._taken_all()
                return gen, valid_end, entries
            finally:
                self._flock.release()

    def _items(
        self, gen: int, entries: list[tuple[int, bytes]]
    ) -> list[tuple[int, str, bytes, Any]]:
        """``(end, cid, bytes, precomputed row or None)`` of journal entries. Runs outside the
        writer lock: appenders only add keys to ``_fresh`` and dict operations are atomic."""
        items: list[tuple[int, str, bytes, Any]] = []
        fresh = self._fresh
        for end, body in entries:
            known = fresh.pop((gen, end), None)
            # The precomputed CID and row are used only for the record they were made from
            # (same journal position and same bytes, by a 64-bit hash: holding the bytes
            # themselves doubled the memory a lagging indexer costs).
            if known is not None and known[1] == hash(body):
                items.append((end, known[0], body, known[2]))
            else:
                items.append((end, cid_for(body), body, None))
        if len(fresh) > 2 * MAX_BEHIND:  # entries another process indexed first
            fresh.clear()
        return items

    def _absorb(self, gen: int, valid_end: int, entries: list[tuple[int, bytes]]) -> int:
        """Blocks, index rows and the watermark, in one index transaction (``_catch_lock``
        held), ``ABSORB_CHUNK`` entries at a time: a journal replayed at start-up or left by
        another process can hold tens of thousands of records, and building all their rows at
        once would set the process's memory high-water mark. Blocks of a chunk go in before
        its rows: a crash only means a replay.
        """
        conn = self._indexer
        inserted_total = 0
        self._index_flock.acquire()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                meta_gen, meta_off = _journal_mark(conn)
                if meta_gen > gen:
                    entries = []  # rotated since: another catch-up absorbed all of these
                elif meta_gen == gen:
                    entries = [e for e in entries if e[0] > meta_off]
                for i in range(0, len(entries), ABSORB_CHUNK):
                    items = self._items(gen, entries[i : i + ABSORB_CHUNK])
                    self._store_blocks([(c, b) for _, c, b, _ in items])
                    inserted = self._index_records(conn, [(c, b, k) for _, c, b, k in items])
                    self._advance_kubo_upto(conn, inserted)
                    inserted_total += len(inserted)
                    del items, inserted
                if (gen, valid_end) > (meta_gen, meta_off):
                    conn.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('journal', ?)", (f"{gen}:{valid_end}",)
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            self._index_flock.release()
        self._absorbed = (gen, valid_end)
        return inserted_total

    def _maybe_rotate(self, gen: int, valid_end: int) -> int:
        """Empty the journal once the index holds all of it. Under steady appends it is never
        quite empty, so past ``ROTATE_AT`` the last few entries are absorbed under the lock
        (a short pause for appenders) to let it shrink. Returns records indexed doing so."""
        if valid_end <= _journal.HEADER:
            return 0
        size = self._journal.size()
        if size != valid_end and size < ROTATE_AT:
            return 0
        n = 0
        with self._wlock:
            self._flock.acquire()
            try:
                if self._journal.generation() != gen:
                    return 0  # another process rotated it
                size = self._journal.size()
                if size != valid_end:
                    if size < ROTATE_AT:
                        return 0
                    entries, tail_end = self._journal.read(valid_end, size)
                    if tail_end < size:
                        log.warning("provenance journal: cutting a torn tail at offset %d",
                                    tail_end)
                        self._journal.truncate(tail_end)
                    if entries:
                        n = self._absorb(gen, tail_end, entries)
                    self._taken_all()
                if _journal_mark(self._writer) != (gen, self._journal.size()):
                    return n  # not all absorbed after all (e.g. an index rebuild in between)
                self._journal.rotate(gen + 1)
                self._head_cache = None
                self._absorbed = (gen + 1, _journal.HEADER)
            finally:
                self._flock.release()
        return n

    def _journal_absorbed(self) -> bool:
        """Cheap lock-free check: is there nothing in the journal to move into the index?"""
        size = self._journal.size()
        if size <= _journal.HEADER:
            return self._journal.generation() > 0
        return self._absorbed == (self._journal.generation(), size)

    def _store_blocks(self, items: list[tuple[str, bytes]]) -> None:
        """Put record blocks into the local store (one transaction; known blocks skipped)."""
        local = self._local
        put_many = getattr(local, "put_many", None) if local is not None else None
        if put_many is None:
            for cid, data in items:
                put_cid = self._blocks.put_block(data, codec="dag-json")[0]
                if put_cid != cid:
                    raise StorageError(f"block store returned CID {put_cid} for record {cid}")
            return
        index = getattr(local, "index", None)
        session = getattr(local, "write_session", None)
        if index is not None and session is not None:
            # Small records go straight in as index rows keyed by their digest (what put_many
            # does, minus re-deriving and comparing a CID string per record, ~10 us each).
            # The digest is taken from the bytes stored, so the row cannot name other content.
            rows = [(_sha256(data).digest(), _DAG_JSON_CODE, len(data), data)
                    for _, data in items if len(data) <= INLINE_MAX]
            big = [(c, data) for c, data in items if len(data) > INLINE_MAX]
            with session():
                index(rows)
            if not big:
                return
            items = big
        cids = put_many([(data, "dag-json") for _, data in items])
        if [str(c) for c in cids] != [c for c, _ in items]:
            raise StorageError("block store returned other CIDs for provenance records")

    def sync(self, limit: int | None = None) -> dict[str, Any]:
        """Push records (and their split-out values) that Kubo does not have yet, oldest
        first, when Kubo answers. ``kubo_upto`` in the index remembers how far it got.

        Why not the block service's queue: its sync walks a root's whole DAG, and a record's
        ``prev`` link reaches every earlier record, so each queued record would re-push the
        entire chain.
        """
        self.catch_up()
        kubo = getattr(self._blocks, "kubo", None)
        if kubo is None or not self._kubo_up():
            return {"pushed": 0, "remaining": self._kubo_lag(), "kubo_available": False}
        pushed = 0
        conn = self._reader()
        while limit is None or pushed < limit:
            upto = self._meta_int(conn, "kubo_upto")
            chunk = 100 if limit is None else min(100, limit - pushed)
            rows = conn.execute(
                "SELECT id, cid, body FROM records WHERE id > ? ORDER BY id LIMIT ?", (upto, chunk)
            ).fetchall()
            if not rows:
                break
            done = upto
            stopped = False
            try:
                for rid, cid, body in rows:
                    for link in _value_links(decode(bytes(body))):
                        kubo.block_put(self._block_bytes(link), "dag-json")
                    got = kubo.block_put(bytes(body), "dag-json")
                    if got.digest != cid_digest(cid):
                        raise StorageError(f"Kubo stored {got} for record {cid}")
                    pushed += 1
                    done = rid
            except (KuboUnavailableError, StorageError, VerificationError) as exc:
                log.info("provenance sync to Kubo stopped: %s", exc)
                stopped = True
            self._set_meta_int("kubo_upto", done, only_if=upto)
            if stopped:
                break
        return {"pushed": pushed, "remaining": self._kubo_lag(), "kubo_available": True}

    def _advance_kubo_upto(
        self, conn: sqlite3.Connection, inserted: list[tuple[int, str]]
    ) -> None:
        """Move ``kubo_upto`` over newly indexed records that append already put in Kubo."""
        upto = start = self._meta_int(conn, "kubo_upto")
        for rid, cid in inserted:
            if rid != upto + 1 or cid not in self._in_kubo:
                self._kubo_behind = True
                break
            upto = rid
        self._in_kubo.difference_update(c for _, c in inserted)
        if len(self._in_kubo) > 4 * BATCH:
            self._in_kubo.clear()
        if upto != start:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('kubo_upto', ?)", (str(upto),))

    def _kubo_lag(self) -> int:
        conn = self._reader()
        upto = self._meta_int(conn, "kubo_upto")
        return int(conn.execute("SELECT count(*) FROM records WHERE id > ?", (upto,)).fetchone()[0])

    @staticmethod
    def _meta_int(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _set_meta_int(self, key: str, value: int, *, only_if: int) -> None:
        """Compare-and-set, so two processes syncing at once never move it backwards."""
        with self._write_txn() as conn:
            if self._meta_int(conn, key) == only_if:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def repair(self) -> int:
        """Complete records whose writer died before indexing/storing them (``catch_up``)."""
        return self.catch_up()

    # ---------------------------------------------------------------------- index rebuild
    def rebuild_index(self) -> int:
        """Drop the index and rebuild it from the record blocks in the local store."""
        self.catch_up()  # the journal's records are in blocks after this
        with self._write_txn() as conn:
            for table in ("records", "postings"):
                conn.execute(f"DELETE FROM {table}")
            n = self._rebuild_locked(conn)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('complete', '1')")
        return n

    def _rebuild_locked(self, conn: sqlite3.Connection) -> int:
        if self._local is None:
            return 0
        found: dict[str, list[tuple[str, bytes, dict[str, Any]]]] = {}
        for cid in self._local.iter_cids("dag-json"):
            try:
                data = self._local.get(cid)
                record = _check_record(str(cid), data)
            except (ProvenanceError, CorruptBlockError, BlockNotFoundError) as exc:
                log.debug("rebuild: skipping block %s: %s", cid, exc)
                continue  # a split-out value, or something that is not a valid record
            rcid = cid_for(data)
            found.setdefault(record["node"], []).append((rcid, data, record))
        chosen: list[tuple[str, bytes, dict[str, Any]]] = []
        for node_records in found.values():
            chosen.extend(_pick_chain(node_records))
        chosen.sort(key=lambda item: (item[2]["ts"], item[2]["node"], item[2]["seq"]))
        for start in range(0, len(chosen), CATCH_UP_CHUNK):
            chunk = chosen[start : start + CATCH_UP_CHUNK]
            self._index_records(conn, [(c, d, None) for c, d, _ in chunk])
        # The journal may hold records not yet in blocks: replay all of it on the next catch-up.
        conn.execute("DELETE FROM meta WHERE key='journal'")
        if chosen:
            log.info("provenance index rebuilt from %d record blocks", len(chosen))
        return len(chosen)

    # ------------------------------------------------------------------------------ reading
    def get(self, cid: str, *, resolve: bool = False) -> dict[str, Any]:
        """The record with this CID (``cid`` key added); from the index, else the block store
        (a record of another node, fetched and signature-checked)."""
        key = cid_key(cid)
        self.catch_up()
        found = self._indexed(self._reader(), key, "id")
        if found is not None:
            record = found[2]  # the local block's bytes (hash-checked), decoded
        else:
            try:
                data = self._blocks.get_block(key)
            except BlockNotFoundError:
                raise NotFoundError(f"no provenance record {cid} here or in IPFS") from None
            record = _check_record(key, data)
        record = {"cid": key, **record}
        return self.resolve(record) if resolve else record

    def _indexed(
        self, conn: sqlite3.Connection, key: str, column: str
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """``(id, column, decoded record)`` of the indexed record ``key``, or None. Found by
        chain position: the local block names its node and seq (records.cid has no index,
        see _schema)."""
        if self._local is None or not key.startswith(RECORD_CID_PREFIX):
            return None  # records are dag-json sha2-256 blocks; a data CID is not one
        try:
            data = self._local.get(key)
            record = decode(data)
            position = (record["node"], int(record["seq"]))
        except (DatasetsError, DecodeError, KeyError, TypeError, ValueError):
            return None  # not here, or not a record: not indexed
        row = conn.execute(
            f"SELECT id, {column}, cid FROM records WHERE node=? AND seq=?", position
        ).fetchone()
        return None if row is None or row[2] != key else (row[0], row[1], record)

    def get_value(self, link: str) -> Any:
        """A split-out large value, decoded (its own links resolved too)."""
        data = self._blocks.get_block(cid_key(link))
        return self._resolve_value(decode(data))

    def resolve(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the links of split-out values in a record by the values themselves."""
        return {
            k: (v if k in RESERVED else self._resolve_value(v)) for k, v in record.items()
        }

    def _resolve_value(self, value: Any) -> Any:
        if isinstance(value, Link):
            return self.get_value(value)
        if isinstance(value, dict):
            return {k: self._resolve_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._resolve_value(v) for v in value]
        return value

    def count(self) -> int:
        self.catch_up()
        return self._reader().execute("SELECT count(*) FROM records").fetchone()[0]

    def counts(self) -> dict[str, Any]:
        """Records by type and this node's chain length."""
        self.catch_up()
        conn = self._reader()
        by_type = dict(conn.execute("SELECT type, count(*) FROM records GROUP BY type"))
        return {
            "records": sum(by_type.values()),
            "by_type": by_type,
            "own_records": conn.execute(
                "SELECT coalesce(max(seq) + 1, 0) FROM records WHERE node=?", (self._node,)
            ).fetchone()[0],
        }

    def head(self, node: str | None = None) -> dict[str, Any] | None:
        self.catch_up()
        row = self._reader().execute(
            "SELECT seq, cid, ts FROM records WHERE node=? ORDER BY seq DESC LIMIT 1",
            (node or self._node,),
        ).fetchone()
        return None if row is None else {"seq": row[0], "cid": row[1], "ts": row[2]}

    # -------------------------------------------------------------------------------- query
    def query(
        self,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = 100,
        since: Any = None,
        until: Any = None,
        *,
        resolve: bool = False,
    ) -> list[dict[str, Any]]:
        """Records matching every filter (equality), newest first, at most ``limit``.

        Filter keys: ``type``, ``node``, ``seq``, ``cid``, ``prev``, ``ts``, ``input_cid``,
        ``output_cid`` (any CID form), any top-level caller field (``model``, ``pr_number``),
        ``data.<name>`` for a member of ``data``, and a bare ``<name>`` matching either a
        top-level field or ``data.<name>``. ``since``/``until`` (inclusive) are aware datetimes
        or unix seconds. Large values match by content, like any other value.
        """
        self.catch_up()
        ids = self._query_ids(filters or {}, _check_limit(limit), since, until)
        return self._load(ids, resolve)

    def _query_ids(
        self, filters: Mapping[str, Any], limit: int, since: Any, until: Any
    ) -> list[int]:
        if not isinstance(filters, Mapping):
            raise InvalidArgumentError(f"filters must be a dict, got {type(filters).__name__}")
        lo, hi = _to_ms(since, "since"), _to_ms(until, "until")
        conn = self._reader()
        postings: list[list[tuple[str, str]]] = []  # each: alternatives (key, val)
        record_conds: list[tuple[str, Any]] = []
        for name, value in filters.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"filter keys must be field names, got {name!r}")
            if name in _RECORD_COLUMNS:
                if name in ("cid", "prev"):
                    value = cid_key(value)
                record_conds.append((_RECORD_COLUMNS[name], value))
            elif name == "type":
                postings.append([("type", filter_key("type", value))])
            elif name in LINK_FIELDS:
                postings.append([(name, cid_key(value))])
            elif name == "data":
                # Always the top-level field (a member named "data" is "data.data").
                postings.extend([posting] for posting in data_filter(value))
            elif name.startswith("data.") and "." not in name[5:] and len(name) > 5:
                postings.append([(name, filter_key(name, value))])
            elif "." in name:
                raise InvalidArgumentError(
                    f"filter {name!r}: filters reach top-level fields and 'data.<name>' only"
                )
            else:
                alts = [
                    (k, filter_key(k, value))
                    for k in (name, f"data.{name}")
                    if conn.execute("SELECT 1 FROM postings WHERE key=? LIMIT 1", (k,)).fetchone()
                ]
                if not alts:
                    return []  # no record has such a field
                postings.append(alts)
        ts_sql, ts_args = "", []
        if lo is not None:
            ts_sql += " AND {t}.ts >= ?"
            ts_args.append(lo)
        if hi is not None:
            ts_sql += " AND {t}.ts <= ?"
            ts_args.append(hi)

        singles = [p for p in postings if len(p) == 1]
        if singles:
            driver = min(singles, key=lambda p: (self._capped_count(conn, p[0], ts_sql, ts_args),
                                                 p[0][0] == "type"))
            others = [p for p in postings if p is not driver]
            sql = "SELECT d.id FROM postings d WHERE d.key=? AND d.val=?" + ts_sql.format(t="d")
            args: list[Any] = [driver[0][0], driver[0][1], *ts_args]
            order = " ORDER BY d.ts DESC, d.id DESC LIMIT ?"
            alias = "d"
        else:
            others = postings
            sql = "SELECT d.id FROM records d WHERE 1" + ts_sql.format(t="d")
            args = list(ts_args)
            order = " ORDER BY d.ts DESC, d.id DESC LIMIT ?"
            alias = "d"
        for alts in others:
            ors = " OR ".join(
                "EXISTS (SELECT 1 FROM postings p WHERE p.key=? AND p.val=?"
                f" AND p.ts={alias}.ts AND p.id={alias}.id)"
                for _ in alts
            )
            sql += f" AND ({ors})"
            for k, v in alts:
                args.extend((k, v))
        if record_conds:
            conds = " AND ".join(f"r.{col}=?" for col, _ in record_conds)
            sql += f" AND EXISTS (SELECT 1 FROM records r WHERE r.id={alias}.id AND {conds})"
            args.extend(v for _, v in record_conds)
        args.append(limit)
        return [row[0] for row in conn.execute(sql + order, args)]

    @staticmethod
    def _capped_count(
        conn: sqlite3.Connection, posting: tuple[str, str], ts_sql: str, ts_args: list[Any]
    ) -> int:
        sql = (
            "SELECT count(*) FROM (SELECT 1 FROM postings c WHERE c.key=? AND c.val=?"
            + ts_sql.format(t="c") + " LIMIT ?)"
        )
        return conn.execute(sql, (posting[0], posting[1], *ts_args, _COUNT_CAP)).fetchone()[0]

    def _load(self, ids: list[int], resolve: bool) -> list[dict[str, Any]]:
        if not ids:
            return []
        conn = self._reader()
        by_id: dict[int, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for rid, cid, body in conn.execute(
                f"SELECT id, cid, body FROM records WHERE id IN ({marks})", chunk
            ):
                record = {"cid": cid, **decode(bytes(body))}
                by_id[rid] = self.resolve(record) if resolve else record
        return [by_id[i] for i in ids if i in by_id]

    # ------------------------------------------------------------------------------ lineage
    def lineage(
        self,
        cid: str,
        direction: str = "upstream",
        depth: int | None = None,
        *,
        limit: int = 10_000,
    ) -> list[dict[str, Any]]:
        """Records linked to ``cid`` through ``input_cid``/``output_cid``, breadth first.

        ``upstream``: the records that produced ``cid``, then those that produced their
        inputs, ...; ``downstream``: the records that used ``cid``, then those that used their
        outputs, ... ``cid`` may be a data CID or a record CID (the record itself is then
        returned first, at depth 0). Each record gets a ``depth`` key (1 = direct). ``depth``
        None follows the graph to its end (cycles are cut); ``limit`` bounds the result.
        """
        if direction not in ("upstream", "downstream"):
            raise InvalidArgumentError(
                f"direction must be 'upstream' or 'downstream', got {direction!r}"
            )
        if depth is not None and (
            isinstance(depth, bool) or not isinstance(depth, int) or depth < 0
        ):
            raise InvalidArgumentError(f"depth must be an integer >= 0 or None, got {depth!r}")
        find_role, next_col = (
            ("output_cid", "input_cid") if direction == "upstream" else ("input_cid", "output_cid")
        )
        key = cid_key(cid)
        self.catch_up()
        conn = self._reader()
        out: list[dict[str, Any]] = []
        seen_records: set[int] = set()
        seen_cids: set[str] = {key}
        frontier: list[str] = [key]
        start = self._indexed(conn, key, next_col)
        if start is not None:
            seen_records.add(start[0])
            out.extend({**r, "depth": 0} for r in self._load([start[0]], False))
            frontier = [c for c in json.loads(start[1] or "[]") if c not in seen_cids]
            seen_cids.update(frontier)
        level = 1
        while frontier and (depth is None or level <= depth) and len(out) < limit:
            found: list[tuple[int, str | None]] = []
            for i in range(0, len(frontier), 500):
                chunk = frontier[i : i + 500]
                marks = ",".join("?" * len(chunk))
                found.extend(conn.execute(
                    f"SELECT r.id, r.{next_col} FROM postings p JOIN records r ON r.id = p.id"
                    f" WHERE p.key=? AND p.val IN ({marks}) ORDER BY p.ts DESC, p.id DESC",
                    (find_role, *chunk),
                ))
            new_ids: list[int] = []
            frontier = []
            for rid, links in found:
                if rid in seen_records:
                    continue
                seen_records.add(rid)
                new_ids.append(rid)
                for c in json.loads(links or "[]"):
                    if c not in seen_cids:
                        seen_cids.add(c)
                        frontier.append(c)
            new_ids = new_ids[: limit - len(out)]
            out.extend({**r, "depth": level} for r in self._load(new_ids, False))
            level += 1
        return out

    # ------------------------------------------------------------------------------- verify
    def verify(self, cid: str | None = None, *, node: str | None = None) -> dict[str, Any]:
        """Check one record (``cid``) or a node's whole chain (default: this node's).

        One record: its block hashes to its CID, is canonical dag-json, carries a valid
        signature of the peer id in ``node``, and its split-out values are present and intact.
        The chain, walked from the head to genesis through ``prev``: every record as above, seq
        decreasing by exactly one, timestamps never increasing backwards, genesis has seq 0 and
        no ``prev``, and the index holds exactly these records at these positions with the same
        bytes. Raises ``VerificationError(cid, detail)`` naming the first broken record;
        returns a summary dict when everything holds.
        """
        if cid is not None:
            key = cid_key(cid)
            self.catch_up()
            record, _ = self._verify_record(key)
            return {"ok": True, "cid": key, "node": record["node"], "seq": record["seq"]}
        self.repair()
        node = node or self._node
        conn = self._reader()
        head = conn.execute(
            "SELECT seq, cid FROM records WHERE node=? ORDER BY seq DESC LIMIT 1", (node,)
        ).fetchone()
        if head is None:
            return {"ok": True, "node": node, "records": 0, "head": None}
        # Streamed in step with the walk (constant memory at any chain length). Rows above
        # the head we read are records appended meanwhile; they are not part of this check.
        cursor = conn.execute(
            "SELECT seq, cid, body FROM records WHERE node=? AND seq<=? ORDER BY seq DESC",
            (node, head[0]),
        )
        try:
            # An unfinished SELECT keeps its read snapshot open: always close the cursor.
            checked = self._walk_chain(node, head[0], head[1], iter(cursor))
        finally:
            cursor.close()
        return {"ok": True, "node": node, "records": checked, "head": head[1]}

    def _walk_chain(
        self, node: str, head_seq: int, head_cid: str, rows: Iterator[tuple[int, str, bytes]]
    ) -> int:
        """Walk from the head to genesis through ``prev``, in step with the index rows
        (streamed newest first, so memory stays constant at any chain length)."""
        expected_seq, current = head_seq, head_cid
        successor: str | None = None
        successor_ts: int | None = None
        checked = 0
        while True:
            record, data = self._verify_record(current, successor=successor)
            if record["node"] != node:
                raise VerificationError(current, f"written by {record['node']}, not by {node}")
            if record["seq"] != expected_seq:
                if successor is None:
                    raise VerificationError(
                        current, f"chain head has seq {record['seq']}, the index says "
                        f"{expected_seq}: the index is reordered",
                    )
                # The break is the record whose prev link skips or goes backwards.
                raise VerificationError(
                    successor,
                    f"its prev {current} has seq {record['seq']}, not {expected_seq}: "
                    "the chain is reordered or has a gap",
                )
            if successor_ts is not None and record["ts"] > successor_ts:
                raise VerificationError(
                    successor, f"timestamp {successor_ts} is before its prev's ({record['ts']})"
                )
            row = next(rows, None)
            if row is None or row[0] != expected_seq or row[1] != current:
                where = "nothing" if row is None or row[0] != expected_seq else row[1]
                raise VerificationError(
                    current,
                    f"the index has {where} at seq {expected_seq} of {node} where the chain has "
                    "this record: the index disagrees with the blocks (edited or reordered)",
                )
            if bytes(row[2]) != data:
                raise VerificationError(current, "the index copy differs from the stored block")
            checked += 1
            prev = record.get("prev")
            if expected_seq == 0:
                if prev is not None:
                    raise VerificationError(current, "seq 0 (genesis) must not have a prev link")
                break
            if prev is None:
                raise VerificationError(
                    current, f"seq {expected_seq} has no prev link: the chain is cut here"
                )
            successor, successor_ts = current, record["ts"]
            current, expected_seq = cid_key(str(prev)), expected_seq - 1
        extra = next(rows, None)
        if extra is not None:
            raise VerificationError(
                extra[1], f"indexed at seq {extra[0]} of {node} but not on the chain"
            )
        return checked

    def _block_bytes(self, cid: str, successor: str | None = None) -> bytes:
        try:
            if self._local is not None:
                try:
                    return self._local.get(cid)
                except BlockNotFoundError:
                    pass
            return self._blocks.get_block(cid)
        except CorruptBlockError as exc:
            raise VerificationError(
                cid, f"stored bytes do not hash to the CID: the record was edited ({exc})"
            ) from None
        except BlockNotFoundError:
            via = f" (it is the prev of {successor})" if successor else ""
            raise VerificationError(
                cid, f"record block is missing from the store{via}: it was removed"
            ) from None

    def _verify_record(
        self, cid: str, successor: str | None = None
    ) -> tuple[dict[str, Any], bytes]:
        data = self._block_bytes(cid, successor)
        if cid_for(data) != cid:
            raise VerificationError(cid, "stored bytes do not hash to the CID: edited")
        record = _check_record(cid, data)
        for link in _value_links(record):
            try:
                self._block_bytes(link)
            except VerificationError as exc:
                raise VerificationError(cid, f"split-out value {link}: {exc.detail}") from None
        return record, data

    # ------------------------------------------------------------------------------- export
    def export_prov(
        self,
        cid: str | None = None,
        *,
        direction: str = "upstream",
        depth: int | None = None,
        filters: Mapping[str, Any] | None = None,
        limit: int = 1000,
    ) -> dict[str, Any]:
        """W3C PROV-JSON of the lineage of ``cid``, or of the records matching ``filters``."""
        if cid is not None:
            records = self.lineage(cid, direction, depth, limit=limit)
        else:
            records = self.query(filters or {}, limit)
        return _prov.to_prov_json(records)

    # -------------------------------------------------------------------------------- close
    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        self._wake.set()
        if self._flusher is not None and self._flusher is not threading.current_thread():
            self._flusher.join(timeout=10)
        try:
            self.catch_up()
        except (sqlite3.Error, DatasetsError) as exc:  # pragma: no cover - best effort
            log.warning("provenance: could not index the last records at close: %s", exc)
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._flock.close()
        self._index_flock.close()
        self._journal.close()


# ------------------------------------------------------------------------------ helpers
def _journal_mark(conn: sqlite3.Connection) -> tuple[int, int]:
    """``(generation, offset)`` of the journal the index has absorbed; ``(-1, 0)``: none."""
    row = conn.execute("SELECT value FROM meta WHERE key='journal'").fetchone()
    if row is None:
        return -1, 0
    gen, off = row[0].split(":")
    return int(gen), int(off)


def _statements(ddl: str) -> list[str]:
    return [s.strip() for s in ddl.split(";") if s.strip()]


def _check_record(cid: str, data: bytes) -> dict[str, Any]:
    """Decode a record block strictly and check its shape and signature."""
    try:
        record = decode_canonical(data)
    except DecodeError as exc:
        raise VerificationError(cid, str(exc)) from None
    if not isinstance(record, dict):
        raise VerificationError(cid, "not a provenance record (not a map)")
    for name, typ in _REQUIRED.items():
        if type(record.get(name)) is not typ:
            raise VerificationError(cid, f"not a provenance record (field {name!r} missing)")
    prev = record.get("prev")
    if prev is not None and not isinstance(prev, Link):
        raise VerificationError(cid, "prev is not a link")
    try:
        ok = verify_signature(record["node"], signing_message(record), record["sig"])
    except (VerificationError, ValueError) as exc:
        raise VerificationError(cid, f"signature cannot be checked: {exc}") from None
    if not ok:
        raise VerificationError(cid, f"bad signature: not signed by {record['node']}")
    return record


def _pick_chain(
    items: list[tuple[str, bytes, dict[str, Any]]],
) -> list[tuple[str, bytes, dict[str, Any]]]:
    """One record per seq for a node: the chain reachable from the newest head wins.

    Our write protocol never forks a chain; this only matters for blocks written by hand or a
    foreign tool. Records below a gap are kept (``verify`` reports the gap).
    """
    by_cid = {c: item for item in items for c in [item[0]]}
    best = max(items, key=lambda it: (it[2]["seq"], it[2]["ts"], it[0]))
    chosen: dict[int, tuple[str, bytes, dict[str, Any]]] = {}
    cur: tuple[str, bytes, dict[str, Any]] | None = best
    while cur is not None and cur[2]["seq"] not in chosen:
        chosen[cur[2]["seq"]] = cur
        prev = cur[2].get("prev")
        cur = by_cid.get(cid_key(str(prev))) if prev is not None else None
    for item in sorted(items, key=lambda it: (it[2]["ts"], it[0])):
        chosen.setdefault(item[2]["seq"], item)
    return [chosen[s] for s in sorted(chosen)]


def _value_links(record: Mapping[str, Any]) -> list[str]:
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, Link):
            out.append(str(v))
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for k, v in record.items():
        if k not in RESERVED:
            walk(v)
    return out
