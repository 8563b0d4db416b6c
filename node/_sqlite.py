"""SQLite helpers shared by the block store, the provenance index and the task queue."""

from __future__ import annotations

import sqlite3
import time


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
