"""A cross-process writer lock beside a SQLite database file (used by the task queue and the
provenance index).

SQLite serialises writers itself, but a writer that finds the database busy *polls*: its busy
handler sleeps 1, 2, 5, 10 ... ms between tries. Our transactions hold the lock for tens of
microseconds, so under contention the sleepers lose every race and several processes end up
slower than one. ``flock`` waits in the kernel and wakes the next waiter the moment the lock is
released, so every writer (in any process) takes this lock around ``BEGIN IMMEDIATE``. It is
only a fast hand-over, not what makes writes safe: that is SQLite's own write lock, so
non-cooperating writers (the sqlite3 shell, another program) are still handled correctly,
through ``busy_timeout``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own locking alone
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class WriterLock:
    def __init__(self, db_path: Path) -> None:
        self._fd: int | None = None
        if fcntl is not None:
            self._fd = os.open(str(db_path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False at once if someone holds it."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError as exc:  # e.g. a network filesystem without flock
                log.warning("flock unavailable (%s); relying on SQLite's locking alone", exc)
                self.close()
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
