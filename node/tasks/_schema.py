"""SQLite schema and connection settings of the task queue.

Durability: WAL with ``synchronous=NORMAL``. A committed transaction is in the WAL file (in the
OS page cache at least) before ``COMMIT`` returns, so it survives the process crashing or being
SIGKILLed at any point; only an OS crash or power loss can drop the last few commits, and even
then the database is never corrupt. ``FULL`` would add an fsync to every commit.
Automatic checkpoints are off for these connections: every ``TaskQueue`` asks its own background
thread (``node._sqlite.Checkpointer``) for a checkpoint every thousand of its commits. The bulk
of the copy runs beside the writers (PASSIVE); only the frames written meanwhile are copied
under the writer lock (RESTART), so the next writer rewinds the log and the WAL stays a few MiB
under any load (the last connection to close checkpoints too).

Indexes exist for the hot paths only:

* ``tasks_claimable`` -- partial index over pending tasks in claim order within one
  (gpu_pref, requires_key) group, so one claim is a handful of index seeks at any queue size;
* ``tasks_p2p`` -- the same restricted to P2P_ELIGIBLE tasks (``claim_next(p2p_only=True)``);
* ``tasks_leases`` -- claimed tasks by lease expiry, for lazy expiry on every call;
* ``tasks_retry`` -- requeued tasks by ``available_at``, so ``reap_expired`` can report
  tasks whose retry backoff just ended;
* ``tasks_done`` -- finished tasks (``completed_at`` is set exactly when a task reaches
  completed, failed or cancelled) by state, for listing and counting them. SQLite appends the
  rowid (``seq``, the insertion order) to every index entry, so "newest first" needs no
  extra column. Pending and claimed tasks are listed and counted through the partial
  indexes above, so a claim or a completion never moves an entry inside one big state
  index (that cost two extra WAL pages per commit).

Layout choices, measured on this workload (100k pending, WAL): a rowid table (appends land on
the right edge of the b-tree) with 2 KiB pages (each commit rewrites fewer bytes into the WAL)
and a 64 MiB page cache did a claim+complete in about 25-40% less time than a
``WITHOUT ROWID`` table keyed by ``task_id`` with 4 KiB pages. Every extra index costs each
state change, so there are only the indexes above.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from node._sqlite import enable_wal
from node.errors import StorageError

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE IF NOT EXISTS tasks (
    seq              INTEGER PRIMARY KEY,  -- rowid: insertion (= commit) order, never reused
    task_id          TEXT NOT NULL UNIQUE,
    task_type        TEXT NOT NULL,
    data             TEXT NOT NULL,     -- canonical JSON
    priority         INTEGER NOT NULL,
    tags             TEXT NOT NULL,     -- JSON list, sorted
    requires         TEXT NOT NULL,     -- JSON list, sorted
    requires_key     TEXT NOT NULL,     -- casefolded requirements joined by \\x1f, '' = none
    gpu_pref         INTEGER NOT NULL,  -- 1 when tagged GPU_PREFERRED
    p2p              INTEGER NOT NULL,  -- 1 when tagged P2P_ELIGIBLE
    max_attempts     INTEGER NOT NULL,
    lease_seconds    REAL NOT NULL,
    owner            TEXT,
    body_hash        TEXT NOT NULL,     -- idempotent submit: same id + same hash = same task
    state            TEXT NOT NULL,
    attempt          INTEGER NOT NULL,  -- 1-based number of the current/next attempt
    worker_id        TEXT,
    lease_id         TEXT,
    lease_expires_at REAL,
    expired_leases   TEXT NOT NULL DEFAULT '',  -- space-separated lease ids that timed out
    available_at     REAL NOT NULL,     -- retry backoff: not claimable before this time
    result           TEXT,              -- JSON
    result_cid       TEXT,
    error            TEXT,
    submitted_at     REAL NOT NULL,
    claimed_at       REAL,
    completed_at     REAL,
    updated_at       REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS tasks_claimable
    ON tasks (gpu_pref, requires_key, priority DESC, submitted_at, task_id)
    WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS tasks_p2p
    ON tasks (gpu_pref, requires_key, priority DESC, submitted_at, task_id)
    WHERE state = 'pending' AND p2p = 1;
CREATE INDEX IF NOT EXISTS tasks_leases
    ON tasks (lease_expires_at) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS tasks_retry
    ON tasks (available_at) WHERE state = 'pending' AND attempt > 1;
CREATE INDEX IF NOT EXISTS tasks_done ON tasks (state) WHERE completed_at IS NOT NULL;

-- Every (GPU_PREFERRED?, requirement set) pair of an open task, kept in the transaction that
-- creates the task and pruned by reap_expired: the short list of index ranges a claim seeks.
CREATE TABLE IF NOT EXISTS claim_groups (
    gpu_pref     INTEGER NOT NULL,
    requires_key TEXT NOT NULL,
    PRIMARY KEY (gpu_pref, requires_key)
) WITHOUT ROWID;
"""


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Open (creating if needed) the queue database with the settings documented above."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(
            str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open task database {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA page_size = 2048")  # only takes effect while the file is empty
        conn.execute("PRAGMA cache_size = -65536")  # KiB
        mode = enable_wal(conn, busy_timeout)
        if str(mode).lower() != "wal":
            raise StorageError(
                f"task database {path} cannot use WAL mode (got {mode!r}); "
                "put cache_dir on a local filesystem"
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        # No automatic checkpoint inside COMMIT (that would run under the writer lock, ~5 ms
        # every ~140 claim/complete cycles); TaskQueue checkpoints after releasing the lock.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"task database {path} has schema version {version}, newer than this "
                    f"dsi ({SCHEMA_VERSION}); upgrade dsi"
                )
            # executescript() would COMMIT first; run the statements inside our transaction
            # (no ';' may appear inside a statement or comment of _DDL).
            for statement in _DDL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        conn.close()
        raise StorageError(f"cannot initialise task database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn
