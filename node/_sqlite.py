"""SQLite helpers shared by the block store, the provenance index and the task queue."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from node._writer_lock import WriterLock

log = logging.getLogger(__name__)


def enable_wal(conn: sqlite3.Connection, timeout: float = 60.0) -> str:
    """Put the database in WAL mode and return the journal mode SQLite reports.

    Why the retry: when several processes open a *new* database at once, switching its
    journal mode needs an exclusive lock, and SQLite answers SQLITE_BUSY at once - without
    calling the busy handler, to avoid a deadlock - to all but one of them. So wait here, with
    a short growing sleep, until the winner has finished (or ``timeout`` passes).
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Checkpointer:
    """Copies a WAL database's log back into the file from a daemon thread.

    A checkpoint costs two fsyncs (WAL, then database), several milliseconds on a loaded
    disk. Run inline it stalls the caller that happens to trigger it; here it runs in a
    thread with its own connection, and since ``sqlite3`` releases the GIL during the
    checkpoint, the owner keeps committing meanwhile. PASSIVE never waits for readers or
    writers, so it is safe beside any number of connections in any process. With
    ``writer_lock`` (every writer of the database takes ``WriterLock``), each checkpoint ends
    with a short RESTART under that lock, so the log is rewound (see ``_checkpoint``).
    """

    def __init__(self, path: str, timeout: float = 30.0, *, writer_lock: bool = False) -> None:
        self._path = path
        self._timeout = timeout
        self._use_writer_lock = writer_lock
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def request(self) -> None:
        """Ask for a checkpoint soon (starts the thread on first use)."""
        with self._lock:
            if self._stop:
                return
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"dsi-checkpoint-{os.path.basename(self._path)}",
                    daemon=True,
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None,
                               check_same_thread=False)
        # Its own open file, so that it excludes this process's writers too (flock).
        lock = WriterLock(Path(self._path)) if self._use_writer_lock else None
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stop:
                    return
                try:
                    self._checkpoint(conn, lock)
                except sqlite3.Error as exc:  # the next request tries again
                    log.warning("checkpoint of %s failed: %s", self._path, exc)
        finally:
            conn.close()
            if lock is not None:
                lock.close()

    def _checkpoint(self, conn: sqlite3.Connection, lock: WriterLock | None) -> None:
        """Copy the log back; with the writer lock, also let the next writer restart it.

        SQLite rewinds the WAL only when a write begins after a checkpoint copied *every*
        frame. Under steady writes a PASSIVE checkpoint from another thread never gets there
        (new frames arrive while it copies), and the log grew without bound: 414 MiB after
        20,000 claim cycles. So after the bulk copy, the few frames written meanwhile are
        copied under the writer lock (a short pause for writers), with RESTART: it waits,
        briefly, for readers to leave the log, so the next writer starts it from the top.
        """
        _busy, log_frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if lock is None or log_frames <= 0 or copied < 0:
            return
        conn.execute("PRAGMA busy_timeout = 200")  # readers are brief; never hold writers long
        try:
            lock.acquire()
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                lock.release()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")

    def close(self) -> None:
        with self._lock:
            self._stop = True
            thread = self._thread
        self._wake.set()
        if thread is not None:
            thread.join()
