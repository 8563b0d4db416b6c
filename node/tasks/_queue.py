"""The durable task queue: leases, retries with backoff, fencing and capability matching.

States: ``pending -> claimed -> completed | failed | cancelled``. ``attempt`` is the 1-based
number of the current (or next) attempt.

Claims and leases
    A claim grants a lease of the task's ``lease_seconds`` (default 60 s) identified by a random
    ``lease_id``; ``heartbeat`` renews it. A lease is expired once ``now >= lease_expires_at``.
    An expired lease puts the task back to ``pending`` with ``attempt + 1``, not claimable
    before ``available_at = now + min(backoff_base * 2 ** (attempt - 2), backoff_max)``
    (1 s, 2 s, 4 s ... by default). When the expired attempt was the last one
    (``attempt == max_attempts``) the task is ``failed`` with the error
    ``"lease expired after N attempts"``. A retryable ``fail`` does the same (its error text
    is kept); a non-retryable one fails the task at once. Expiry is applied lazily by every
    claim, status, list and count, and by ``reap_expired()``, which a node calls periodically.

Fencing
    Only the current lease holder may heartbeat, complete or fail: the ``lease_id`` must be the
    current one, the lease unexpired, and ``worker_id`` (when given) the holder's. A holder
    whose lease timed out gets ``LeaseExpiredError`` (also after another worker took or
    finished the task); a lease id this task never had, or the wrong ``worker_id``, gets
    ``LeaseError``; a task that is finished or cancelled gets ``TaskStateError``. None of
    these changes the task, so a late completion never overwrites the new holder's work.
    Repeating a completion with the same lease and result is a no-op that returns the status
    (safe retries over a network).

Order and matching
    Candidates are the pending tasks whose ``available_at`` has passed and whose ``requires``
    are all in the worker's capabilities (case-insensitive; hard requirements are never
    waived). Among candidates, *best* means highest priority, then earliest submit time, then
    smallest task id. The ``GPU_PREFERRED`` tag splits the candidates in two groups:

    * a GPU-capable worker (capabilities contain GPU, CUDA, ROCM, MPS or XPU) takes the best
      GPU_PREFERRED candidate if there is one, otherwise the best of the others;
    * any other worker takes the best candidate *without* GPU_PREFERRED if there is one, and a
      GPU_PREFERRED task only when nothing else fits.

    So the preference outranks priority (a GPU worker takes a priority-2 GPU_PREFERRED task
    before a priority-9 plain one): GPU workers stay on GPU work, CPU workers on the rest, and
    nothing starves when only one kind of worker is around.

Concurrency
    Every change runs in a ``BEGIN IMMEDIATE`` transaction under a cross-process file lock
    (``_lock``), so any number of TaskQueue objects, threads and processes sharing one database
    file never grant one task twice. ``claim_next`` chooses its candidates before taking the
    lock (WAL readers do not block the writer) and, under the lock, flips the first one that
    is still the pending version it read (``state`` and ``attempt`` re-checked by the UPDATE);
    if none is, it chooses again under the lock. One object is thread-safe (one connection,
    one mutex); use one object per process.

Non-blocking calls
    Inside ``with queue.nonblocking():`` a call that would have to wait -- for another
    thread using this object or for another process's write -- raises ``QueueBusy`` before
    changing anything, instead of waiting. An event loop runs calls inline this way (a few
    hundred microseconds of CPU) and hands only the ones that would wait to a thread, which
    saves a thread hop per call. (A writer that bypasses dsi's lock, such as the sqlite3
    shell, can still make SQLite's own busy handler wait.)

Listeners
    ``add_listener(cb)``: ``cb(event)`` runs after each committed change made through this
    object (submit, claim, complete, fail, cancel, requeue/fail by expiry; not heartbeats),
    outside the database lock and never in non-blocking mode. ``event`` has ``event``
    (submitted, claimed, completed, failed, cancelled, requeued), ``task_id``, ``state``,
    ``attempt``, ``max_attempts``, ``worker_id``, ``tags``, ``priority``, ``task_type``,
    ``requires``, ``submitted_at``, ``owner``, ``error``, ``available_at``,
    ``lease_expires_at``. A listener that raises is logged and otherwise ignored.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node._bounded import BoundedDict
from node._sqlite import Checkpointer
from node._writer_lock import WriterLock
from node.errors import (
    AlreadyClaimedError,
    ConflictError,
    DatasetsError,
    IncapableError,
    InvalidArgumentError,
    LeaseError,
    LeaseExpiredError,
    NotFoundError,
    PeerDeniedError,
    StorageError,
    TaskStateError,
)
from node.tasks import _model as m
from node.tasks._rows import (
    COL_NAMES,
    COLS,
    EMPTY_ROW,
    event_dict,
    grant_dict,
    offer_dict,
    row_dict,
    status_dict,
)
from node.tasks._schema import connect

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]
_Event = tuple[str, dict[str, Any]]  # (event name, row) until a listener needs the dict
# Positions in a COLS row of the claim order's sort key.
_PRIORITY, _SUBMITTED, _TASK_ID = (
    COL_NAMES.index("priority"), COL_NAMES.index("submitted_at"), COL_NAMES.index("task_id")
)
# claim_next reads this many candidates before taking the writer lock: when N workers race,
# the k-th one in line finds the first k-1 taken and flips the next (see claim_next).
_CANDIDATES = 4
_GRANTED_MAX = 4096  # rows of open grants remembered per TaskQueue object
MAX_BATCH = 10_000  # tasks per submit_many call
# Commits by one TaskQueue between the PASSIVE checkpoints its background thread runs.
# A checkpoint costs two fsyncs whatever its size (measured here: ~8 ms under load, the
# dominant cost at 256), so rarely: 1,000 commits is ~5 MB of WAL. Run inline they cost a
# single process ~10% of its cycles/s (2,381 -> 2,650 in an interleaved A/B at 100k pending)
# and stalled one call in a thousand for ~55 ms.
_CHECKPOINT_EVERY = 1000

_INSERT_COLS = (
    "task_id", "task_type", "data", "priority", "tags", "requires", "requires_key", "gpu_pref",
    "p2p", "max_attempts", "lease_seconds", "owner", "body_hash", "state", "attempt",
    "available_at", "submitted_at", "updated_at",
)
_INSERT = (
    f"INSERT INTO tasks ({', '.join(_INSERT_COLS)}) "
    f"VALUES ({', '.join('?' * len(_INSERT_COLS))}) ON CONFLICT (task_id) DO NOTHING"
)


class QueueBusy(Exception):
    """Raised inside ``TaskQueue.nonblocking()`` instead of waiting; nothing was changed."""


def _repeated(row: dict[str, Any]) -> dict[str, Any]:
    """The status answered to a report the queue already had: nothing changed this time."""
    return {**status_dict(row), "repeated": True}


class TaskQueue:
    """A durable, multi-process-safe task queue in one SQLite file (see the module docs).

    ``clock`` (unix seconds) is injectable so tests can move time; processes sharing a file
    must share a clock, which ``time.time`` is. ``backoff_base``/``backoff_max`` set the retry
    backoff applied by *this* object when it requeues a task. One object per process: after
    ``fork`` open a new TaskQueue in the child (SQLite connections must not cross a fork).
    """

    def __init__(
        self,
        db_path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        busy_timeout: float = 30.0,
    ) -> None:
        if backoff_base < 0 or backoff_max < backoff_base:
            raise InvalidArgumentError("need 0 <= backoff_base <= backoff_max")
        self.db_path = Path(db_path)
        self._clock = clock
        self._backoff_base = float(backoff_base)
        self._backoff_max = float(backoff_max)
        self._mutex = threading.Lock()
        self._nonblocking = threading.local()
        self._conn: sqlite3.Connection | None = connect(self.db_path, busy_timeout)
        self._writer = WriterLock(self.db_path)
        self._checkpointer = Checkpointer(str(self.db_path), writer_lock=True)
        self._listeners: builtins.list[Listener] = []
        self._key_reqs: dict[str, frozenset[str]] = {}
        self._reap_mark = 0.0
        self._commits = 0
        # Rows as this object granted them (task_id -> row), so complete() and fail() need no
        # read before taking the writer lock. With several processes on one file every read
        # after another process's commit starts from a cold page cache (SQLite drops it), so
        # each read saved is a handful of page loads. Only a hint: the fenced UPDATE decides.
        self._granted: BoundedDict[str, dict[str, Any]] = BoundedDict(_GRANTED_MAX)
        self._granted_lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._checkpointer.close()
                self._conn.close()
                self._conn = None
                self._writer.close()

    def __enter__(self) -> TaskQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, callback: Listener) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _emit(self, events: builtins.list[tuple[str, dict[str, Any]]]) -> None:
        """Tell listeners about committed changes (events are built only when someone listens)."""
        listeners = builtins.list(self._listeners)
        if not listeners:
            return
        # The change is committed: a listener that calls back into the queue waits as usual
        # instead of getting QueueBusy from the caller's nonblocking() block.
        nonblocking = getattr(self._nonblocking, "on", False)
        self._nonblocking.on = False
        try:
            for name, row in events:
                event = event_dict(name, row)
                for callback in listeners:
                    try:
                        callback(event)
                    except Exception:
                        log.exception(
                            "task listener %r failed on %s", callback, event.get("event")
                        )
        finally:
            self._nonblocking.on = nonblocking

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatasetsError(f"task queue {self.db_path} is closed; open a new TaskQueue")
        return self._conn

    @contextmanager
    def nonblocking(self) -> Iterator[None]:
        """Calls in this block raise QueueBusy instead of waiting (see the module docs)."""
        previous = getattr(self._nonblocking, "on", False)
        self._nonblocking.on = True
        try:
            yield
        finally:
            self._nonblocking.on = previous

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under this object's mutex (reads see the latest commit)."""
        if not self._mutex.acquire(blocking=not getattr(self._nonblocking, "on", False)):
            raise QueueBusy("another thread is using this task queue")
        try:
            yield self._connection()
        except sqlite3.Error as exc:
            raise StorageError(f"task database {self.db_path}: {exc}") from exc
        finally:
            self._mutex.release()

    @contextmanager
    def _txn(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One IMMEDIATE transaction under the writer lock; call with the mutex held.

        Commits on normal exit, rolls back on an exception. Keep the body short: this is the
        one section that every process serialises on.
        """
        if not self._writer.acquire(blocking=not getattr(self._nonblocking, "on", False)):
            raise QueueBusy("another process is writing to this task queue")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            self._writer.release()
        self._commits += 1
        if self._commits >= _CHECKPOINT_EVERY:
            # Automatic checkpoints are off (see _schema): copying the WAL back into the
            # database runs in our checkpoint thread, so neither this caller nor the writers
            # of other processes wait for its fsyncs.
            self._commits = 0
            self._checkpointer.request()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._read() as conn, self._txn(conn):
            yield conn

    def _remember_grant(self, row: dict[str, Any]) -> None:
        with self._granted_lock:
            self._granted[row["task_id"]] = row  # bounded: leases nobody finishes here

    def _granted_row(
        self, conn: sqlite3.Connection, task_id: str, lease_id: Any
    ) -> dict[str, Any] | None:
        """The row as this object granted it under ``lease_id``, else as stored now. Only the
        fields a completion or failure sets can differ while that lease is held."""
        with self._granted_lock:
            row = self._granted.pop(task_id, None)
        if row is not None and row["lease_id"] == lease_id:
            return row
        return self._get(conn, task_id)

    def _backoff(self, next_attempt: int) -> float:
        return min(self._backoff_base * 2 ** max(next_attempt - 2, 0), self._backoff_max)

    def _requirements(self, key: str) -> frozenset[str]:
        reqs = self._key_reqs.get(key)
        if reqs is None:
            reqs = self._key_reqs[key] = m.key_requirements(key)
        return reqs

    @staticmethod
    def _get(conn: sqlite3.Connection, task_id: str) -> dict[str, Any] | None:
        row = conn.execute(f"SELECT {COLS} FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        return row_dict(row)

    @staticmethod
    def _not_found(task_id: str) -> NotFoundError:
        return NotFoundError(f"no task with id {task_id!r} in this queue; submit it first")

    def _update(
        self, conn: sqlite3.Connection, task_id: str, **values: Any
    ) -> dict[str, Any]:
        """UPDATE one row and return it as a dict (RETURNING: no second read)."""
        sets = ", ".join(f"{k} = ?" for k in values)
        row = conn.execute(
            f"UPDATE tasks SET {sets} WHERE task_id = ? RETURNING {COLS}",
            (*values.values(), task_id),
        ).fetchone()
        return dict(zip(COL_NAMES, row, strict=True))

    # ------------------------------------------------------------------ expiry
    def _expire(
        self, conn: sqlite3.Connection, now: float, task_id: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Apply every due lease expiry (or only ``task_id``'s); returns the events."""
        sql = (
            "SELECT task_id, attempt, max_attempts, lease_id, expired_leases, worker_id "
            "FROM tasks INDEXED BY tasks_leases WHERE state = 'claimed' AND lease_expires_at <= ?"
        )
        args: tuple[Any, ...] = (now,)
        if task_id is not None:
            sql += " AND task_id = ?"
            args = (now, task_id)
        events: builtins.list[_Event] = []
        for tid, attempt, max_attempts, lease_id, expired, worker in conn.execute(
            sql, args
        ).fetchall():
            common = {
                "lease_id": None,
                "lease_expires_at": None,
                "expired_leases": f"{expired} {lease_id}".strip(),
                "updated_at": now,
            }
            if attempt >= max_attempts:
                row = self._update(
                    conn, tid, state=m.FAILED, completed_at=now,
                    error=f"lease expired after {attempt} attempts", **common,
                )
                events.append(("failed", row))
            else:
                row = self._update(
                    conn, tid, state=m.PENDING, attempt=attempt + 1, worker_id=None,
                    available_at=now + self._backoff(attempt + 1),
                    error=f"lease of worker {worker!r} expired (attempt {attempt} of "
                    f"{max_attempts})",
                    **common,
                )
                events.append(("requeued", row))
        return events

    def _expire_if_due(self) -> None:
        """Lazy expiry for read paths: only takes the writer lock when a lease is due."""
        events: builtins.list[_Event] = []
        with self._read() as conn:
            if self._lease_due(conn, self._clock()):
                with self._txn(conn):
                    events = self._expire(conn, self._clock())
        self._emit(events)

    # ------------------------------------------------------------------ submit
    @staticmethod
    def _submission(
        task_id: str,
        task_type: str,
        data: Any,
        priority: int = 5,
        tags: Any = None,
        requires: Any = None,
        max_attempts: int = 3,
        lease_seconds: float = 60,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """A task's row without its timestamps, validated and encoded (no lock needed)."""
        m.check_id(task_id)
        m.check_id(task_type, "task_type")
        priority = m.check_priority(priority)
        max_attempts = m.check_max_attempts(max_attempts)
        lease_seconds = m.check_lease_seconds(lease_seconds)
        if owner is not None:
            m.check_id(owner, "owner")
        data_json = m.to_json(data, "data")
        tag_list = m.norm_tags(tags)
        req_list = m.norm_requires(requires)
        key = m.requires_key(req_list)
        tags_json, reqs_json = m.list_json(tag_list), m.list_json(req_list)
        return {
            "task_id": task_id, "task_type": task_type, "data": data_json,
            "priority": priority, "tags": tags_json, "requires": reqs_json,
            "requires_key": key, "gpu_pref": int(m.has_tag(tag_list, m.TAG_GPU_PREFERRED)),
            "p2p": int(m.has_tag(tag_list, m.TAG_P2P_ELIGIBLE)), "max_attempts": max_attempts,
            "lease_seconds": lease_seconds, "owner": owner,
            "body_hash": m.body_hash(
                task_type, data_json, priority, tags_json, key, max_attempts, lease_seconds
            ),
            "state": m.PENDING, "attempt": 1,
        }

    def _insert(
        self, conn: sqlite3.Connection, sub: dict[str, Any], now: float,
        events: builtins.list[_Event], order: int = 0,
    ) -> dict[str, Any]:
        """Insert one submission (inside a write transaction); returns its row. The same id
        with the same body is the existing task; with another body, ConflictError.
        ``order``: position in a batch, as microseconds added to the submit time."""
        values = {**sub, "available_at": now, "submitted_at": now + order * 1e-6,
                  "updated_at": now}
        if conn.execute(_INSERT, tuple(values[c] for c in _INSERT_COLS)).rowcount == 1:
            conn.execute(
                "INSERT INTO claim_groups VALUES (?, ?) ON CONFLICT DO NOTHING",
                (values["gpu_pref"], values["requires_key"]),
            )
            row = {**EMPTY_ROW, **values}
            events.append(("submitted", row))
            return row
        existing = self._get(conn, sub["task_id"])
        assert existing is not None  # tasks are never deleted
        if existing["body_hash"] != sub["body_hash"]:
            raise ConflictError(
                f"task {sub['task_id']!r} already exists with a different body (type, data, "
                "priority, tags, requires, max_attempts or lease_seconds); use a new id"
            )
        return existing

    def submit(
        self,
        task_id: str,
        task_type: str,
        data: Any,
        priority: int = 5,
        tags: Any = None,
        requires: Any = None,
        max_attempts: int = 3,
        lease_seconds: float = 60,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Add a task (idempotent by id and body); returns its status."""
        sub = self._submission(
            task_id, task_type, data, priority, tags, requires, max_attempts, lease_seconds,
            owner,
        )
        events: builtins.list[_Event] = []
        with self._write() as conn:
            row = self._insert(conn, sub, self._clock(), events)
        self._emit(events)
        return status_dict(row)

    def submit_many(
        self, tasks: Iterable[Mapping[str, Any]], *, owner: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """Add many tasks in one transaction: all of them or, on any error, none.

        Each item holds ``submit``'s arguments by name (``task_id``, ``task_type``, ``data``
        and optionally ``priority``, ``tags``, ``requires``, ``max_attempts``,
        ``lease_seconds``); ``owner`` applies to all. Idempotent like ``submit``, item by
        item. Tasks of one call get submit times a microsecond apart in the order given, so
        equal priorities run in that order. At most ``MAX_BATCH`` items per call (the
        writer lock is held for the whole batch, ~30 us per task). Returns the statuses in
        the order given.
        """
        subs: builtins.list[dict[str, Any]] = []
        for i, item in enumerate(tasks):
            if len(subs) >= MAX_BATCH:
                raise InvalidArgumentError(
                    f"more than {MAX_BATCH} tasks in one submit_many call; split the batch"
                )
            if not isinstance(item, Mapping):
                raise InvalidArgumentError(
                    f"task {i} of the batch is a {type(item).__name__}, not a dict of "
                    "submit_task's arguments"
                )
            try:
                subs.append(self._submission(**item, owner=owner))
            except TypeError as exc:  # unknown or missing argument names
                raise InvalidArgumentError(f"task {i} of the batch: {exc}") from None
        events: builtins.list[_Event] = []
        rows: builtins.list[dict[str, Any]] = []
        if subs:
            with self._write() as conn:
                now = self._clock()
                for i, sub in enumerate(subs):
                    rows.append(self._insert(conn, sub, now, events, i))
        self._emit(events)
        return [status_dict(row) for row in rows]

    # ------------------------------------------------------------------ claim
    def _pick(
        self,
        conn: sqlite3.Connection,
        now: float,
        caps: frozenset[str] | None,
        gpu_first: bool,
        p2p_only: bool,
        limit: int,
        split_groups: bool,
        groups: builtins.list[tuple[int, str]] | None = None,
    ) -> builtins.list[dict[str, Any]]:
        """The best ``limit`` candidates, as full rows, best first.

        One index seek per claim group -- (GPU_PREFERRED or not, requirement set) -- the
        worker's capabilities cover: claim cost does not grow with the number of pending
        tasks, only with the number of distinct groups. With ``split_groups`` the preferred
        GPU side is exhausted first.
        """
        if groups is None:
            groups = conn.execute("SELECT gpu_pref, requires_key FROM claim_groups").fetchall()
        index, extra = ("tasks_p2p", " AND p2p = 1") if p2p_only else ("tasks_claimable", "")
        # Whole rows: the seek visits each candidate's row anyway (available_at), and a
        # claim needs its data, so no second read is needed after winning one.
        sql = (
            f"SELECT {COLS} FROM tasks INDEXED BY {index} "
            f"WHERE state = 'pending'{extra} AND gpu_pref = ? AND requires_key = ? "
            "AND available_at <= ? ORDER BY priority DESC, submitted_at, task_id LIMIT ?"
        )
        found: builtins.list[tuple[Any, ...]] = []
        for side in (1, 0) if gpu_first else (0, 1):
            for gpu, key in groups:
                if gpu == side and (caps is None or self._requirements(key) <= caps):
                    found.extend(conn.execute(sql, (gpu, key, now, limit)).fetchall())
            if split_groups and found:
                break
        found.sort(key=lambda r: (-r[_PRIORITY], r[_SUBMITTED], r[_TASK_ID]))
        return [dict(zip(COL_NAMES, r, strict=True)) for r in found[:limit]]

    @staticmethod
    def _flip(
        conn: sqlite3.Connection, pick: dict[str, Any], worker_id: str, lease_id: str,
        now: float,
    ) -> float | None:
        """Lease the picked task if it is still the pending version that was read; returns
        the lease expiry, or None when someone else changed it first.

        A pending task changes only by leaving ``pending`` or by coming back with
        ``attempt + 1``, so ``state = 'pending' AND attempt = ?`` proves what was read (even
        outside the writer lock) is still current. No RETURNING: in SQLite it costs about
        as much as the UPDATE's own index work, and all of it would be inside the lock.
        """
        expires = now + pick["lease_seconds"]
        cur = conn.execute(
            "UPDATE tasks SET state = 'claimed', worker_id = ?, lease_id = ?, "
            "lease_expires_at = ?, claimed_at = ?, updated_at = ? "
            "WHERE seq = ? AND state = 'pending' AND attempt = ? AND available_at <= ?",
            (worker_id, lease_id, expires, now, now, pick["seq"], pick["attempt"], now),
        )
        return expires if cur.rowcount == 1 else None

    @staticmethod
    def _lease_due(conn: sqlite3.Connection, now: float) -> bool:
        return (
            conn.execute(
                "SELECT 1 FROM tasks INDEXED BY tasks_leases "
                "WHERE state = 'claimed' AND lease_expires_at <= ? LIMIT 1",
                (now,),
            ).fetchone()
            is not None
        )

    def claim_next(
        self, worker_id: str, capabilities: Any = None, *, p2p_only: bool = False
    ) -> dict[str, Any] | None:
        """Claim the best task for this worker (rule in the module docs), or None."""
        m.check_id(worker_id, "worker_id")
        caps = m.norm_capabilities(capabilities)
        gpu_first = m.is_gpu_worker(caps)
        events: builtins.list[_Event] = []
        row: dict[str, Any] | None = None
        lease_id = secrets.token_hex(16)
        won: dict[str, Any] | None = None
        with self._read() as conn:
            # Choose outside the writer lock -- WAL readers run in parallel with the writer --
            # then take the lock only to flip a chosen row, re-checked by the UPDATE. Racing
            # workers all see the same best tasks, so read a few: the k-th worker in line
            # finds the first k-1 taken and gets the next. If every candidate went (or leases
            # are due to expire), choose again under the lock. A claim that finds nothing
            # never takes the writer lock, so idle workers poll for free.
            now = self._clock()
            # One statement (one WAL read snapshot) for "is any lease due?" and the keys.
            survey = conn.execute(
                "SELECT (SELECT 1 FROM tasks INDEXED BY tasks_leases WHERE state = 'claimed' "
                "AND lease_expires_at <= ? LIMIT 1), gpu_pref, requires_key FROM claim_groups",
                (now,),
            ).fetchall()
            # A claimed task keeps its group listed, so no groups also means nothing is due.
            due = bool(survey) and survey[0][0] is not None
            picked = self._pick(conn, now, caps, gpu_first, p2p_only, _CANDIDATES, True,
                                [(g, k) for _, g, k in survey])
            if not picked and not due:
                return None
            with self._txn(conn):
                now = self._clock()
                for pick in () if due else picked:
                    expires = self._flip(conn, pick, worker_id, lease_id, now)
                    if expires is not None:
                        won = pick
                        break
                if won is None:
                    events = self._expire(conn, now)
                    picked = self._pick(conn, now, caps, gpu_first, p2p_only, 1, True)
                    if picked:
                        won = picked[0]
                        expires = self._flip(conn, won, worker_id, lease_id, now)
                        assert expires is not None  # picked under the same writer lock
        if won is not None:
            # The row as read, with what the UPDATE set overlaid: the fields a claim does not
            # set do not change while the task stays this pending version (checked above).
            row = {**won, "state": m.CLAIMED, "worker_id": worker_id, "lease_id": lease_id,
                   "lease_expires_at": expires, "claimed_at": now, "updated_at": now}
            self._remember_grant(row)
            events.append(("claimed", row))
        self._emit(events)  # outside the mutex: a listener may call back into the queue
        return grant_dict(row) if row is not None else None

    def claim(
        self, task_id: str, worker_id: str, capabilities: Any = None, *, p2p_only: bool = False
    ) -> dict[str, Any]:
        """Claim one given task (the owner side of a remote claim); one concurrent caller wins.

        Raises NotFoundError, IncapableError (requires not covered), AlreadyClaimedError,
        TaskStateError (finished, or still in retry backoff) and, with ``p2p_only``,
        PeerDeniedError for a task not tagged P2P_ELIGIBLE.
        """
        m.check_id(task_id)
        m.check_id(worker_id, "worker_id")
        caps = m.norm_capabilities(capabilities)
        error: DatasetsError | None = None
        grant = None
        with self._write() as conn:
            now = self._clock()
            events = self._expire(conn, now, task_id)
            row = self._get(conn, task_id)
            if row is None:
                error = self._not_found(task_id)
            elif p2p_only and not row["p2p"]:
                error = PeerDeniedError(
                    f"task {task_id!r} is not P2P_ELIGIBLE: its owner runs it locally only"
                )
            elif not self._requirements(row["requires_key"]) <= caps:
                missing = sorted(self._requirements(row["requires_key"]) - caps)
                error = IncapableError(
                    f"task {task_id!r} requires {', '.join(missing)}, which the worker's "
                    "capabilities do not include"
                )
            elif row["state"] == m.CLAIMED:
                error = AlreadyClaimedError(
                    f"task {task_id!r} is already claimed by another worker; pick another task"
                )
            elif row["state"] != m.PENDING:
                error = TaskStateError(f"task {task_id!r} is {row['state']}; it cannot be claimed")
            elif row["available_at"] > now:
                error = TaskStateError(
                    f"task {task_id!r} is waiting {row['available_at'] - now:.1f} s of retry "
                    "backoff; claim it later"
                )
            else:
                lease_id = secrets.token_hex(16)
                expires = self._flip(conn, row, worker_id, lease_id, now)
                assert expires is not None  # checked above, under the same writer lock
                grant = {**row, "state": m.CLAIMED, "worker_id": worker_id,
                         "lease_id": lease_id, "lease_expires_at": expires,
                         "claimed_at": now, "updated_at": now}
                self._remember_grant(grant)
                events.append(("claimed", grant))
        self._emit(events)
        if error is not None:
            raise error
        assert grant is not None
        return grant_dict(grant)

    # ------------------------------------------------------------------ lease holder ops
    def _check_holder(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        lease_id: Any,
        worker_id: str | None,
        now: float,
        events: builtins.list[_Event],
    ) -> tuple[dict[str, Any] | None, DatasetsError | None]:
        """(row, None) when the caller holds the current lease, else (row, the error).

        An expired-but-unreaped lease is expired here (committed with the transaction), so
        the refusal and the requeue are one atomic step.
        """
        if not isinstance(lease_id, str) or not lease_id:
            return None, InvalidArgumentError(
                f"lease_id must be the non-empty string from the claim, got {lease_id!r}"
            )
        row = self._get(conn, task_id)
        if row is None:
            return None, self._not_found(task_id)
        expired_before = lease_id in row["expired_leases"].split()
        if row["state"] == m.CLAIMED and row["lease_id"] == lease_id:
            if worker_id is not None and worker_id != row["worker_id"]:
                return row, LeaseError(
                    f"task {task_id!r} is leased to worker {row['worker_id']!r}, not "
                    f"{worker_id!r}"
                )
            if row["lease_expires_at"] <= now:
                events.extend(self._expire(conn, now, task_id))
                return self._get(conn, task_id), LeaseExpiredError(
                    f"the lease on task {task_id!r} expired at {row['lease_expires_at']:.3f}; "
                    "the task was put back in the queue, do not report it"
                )
            return row, None
        if expired_before:
            holder = (
                f"it is now held by worker {row['worker_id']!r}"
                if row["state"] == m.CLAIMED
                else f"it is now {row['state']}"
            )
            return row, LeaseExpiredError(
                f"your lease on task {task_id!r} expired and {holder}; the result is refused"
            )
        if row["state"] == m.CLAIMED:
            return row, LeaseError(
                f"task {task_id!r} is held under another lease; only the current lease holder "
                "may heartbeat, complete or fail it"
            )
        if row["state"] == m.PENDING:
            return row, LeaseError(f"task {task_id!r} is not claimed; claim it first")
        return row, TaskStateError(
            f"task {task_id!r} is already {row['state']}; it cannot be changed any more"
        )

    @staticmethod
    def _fenced_update(
        conn: sqlite3.Connection,
        where: str,
        key: Any,
        lease_id: Any,
        worker_id: str | None,
        now: float,
        sets: str,
        args: tuple[Any, ...],
        returning: str = "",
    ) -> Any:
        """Apply ``sets`` to the row ``where`` (``"task_id = ?"`` or ``"seq = ?"``) = ``key``,
        only if the caller holds its current, unexpired lease.

        Returns the ``returning`` columns (or True) when it applied, None otherwise.
        """
        if not isinstance(lease_id, str):
            return None
        cur = conn.execute(
            f"UPDATE tasks SET {sets} WHERE {where} AND state = 'claimed' AND lease_id = ? "
            "AND lease_expires_at > ? AND (? IS NULL OR worker_id = ?)"
            + (f" RETURNING {returning}" if returning else ""),
            (*args, key, lease_id, now, worker_id, worker_id),
        )
        if returning:
            return cur.fetchone()
        return True if cur.rowcount == 1 else None

    def heartbeat(self, task_id: str, lease_id: str, worker_id: str | None = None) -> float:
        """Renew the lease for another ``lease_seconds``; returns the new expiry."""
        m.check_id(task_id)
        events: builtins.list[_Event] = []
        error: DatasetsError | None = None
        with self._write() as conn:
            now = self._clock()
            renewed = self._fenced_update(
                conn, "task_id = ?", task_id, lease_id, worker_id, now,
                "lease_expires_at = ? + lease_seconds, updated_at = ?", (now, now),
                returning="lease_expires_at",
            )
            if renewed is None:
                _, error = self._check_holder(conn, task_id, lease_id, worker_id, now, events)
                assert error is not None
        self._emit(events)
        if error is not None:
            raise error
        return float(renewed[0])

    def complete(
        self,
        task_id: str,
        lease_id: str,
        result: Any,
        result_cid: str | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        """Finish the task with a JSON result (and optionally the CID of a bigger output).

        The same holder completing again with the same result (a retried call whose first
        answer was lost) is accepted: the status comes back with ``repeated: True`` and
        nothing changes, so callers record the execution once."""
        m.check_id(task_id)
        result_json = m.to_json(result, "result")
        result_cid = m.check_cid(result_cid)
        events: builtins.list[_Event] = []
        error: DatasetsError | None = None
        row: dict[str, Any] | None = None
        with self._read() as conn:
            # Read the row before taking the writer lock: it is the status to return (only
            # the fields a completion sets can differ while the caller holds the lease), and
            # its seq lets the fenced UPDATE find the row without the task_id index.
            before = self._granted_row(conn, task_id, lease_id)
            with self._txn(conn):
                now = self._clock()
                done = None
                if before is not None and before["lease_id"] == lease_id:
                    done = self._fenced_update(
                        conn, "seq = ?", before["seq"], lease_id, worker_id, now,
                        "state = 'completed', result = ?, result_cid = ?, error = NULL, "
                        "lease_expires_at = NULL, completed_at = ?, updated_at = ?",
                        (result_json, result_cid, now, now),
                    )
                if done is None:
                    # Work out why not (and apply a due expiry) under the same lock.
                    row, error = self._check_holder(
                        conn, task_id, lease_id, worker_id, now, events
                    )
                    assert error is not None  # the fenced UPDATE matches any valid lease
                    if (
                        row is not None
                        and row["state"] == m.COMPLETED
                        and row["lease_id"] == lease_id
                        and (worker_id is None or worker_id == row["worker_id"])
                    ):
                        # The same holder reporting again (e.g. a retried network call).
                        same = row["result"] == result_json and row["result_cid"] == result_cid
                        error = None if same else ConflictError(
                            f"task {task_id!r} was already completed with a different result"
                        )
        if done is not None:
            assert before is not None
            row = {**before, "state": m.COMPLETED, "result": result_json,
                   "result_cid": result_cid, "error": None, "lease_expires_at": None,
                   "completed_at": now, "updated_at": now}
            events.append(("completed", row))
        self._emit(events)
        if error is not None:
            raise error
        assert row is not None
        return status_dict(row) if done is not None else _repeated(row)

    def fail(
        self,
        task_id: str,
        lease_id: str,
        error: Any,
        retryable: bool = True,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        """Report a failed attempt: retried with backoff while attempts remain, else failed.
        The same failure reported again is accepted with ``repeated: True`` (see complete)."""
        m.check_id(task_id)
        text = m.error_text(error)
        events: builtins.list[_Event] = []
        repeated = False
        with self._granted_lock:
            self._granted.pop(task_id, None)
        with self._write() as conn:
            now = self._clock()
            row, exc = self._check_holder(conn, task_id, lease_id, worker_id, now, events)
            if exc is None:
                assert row is not None
                if retryable and row["attempt"] < row["max_attempts"]:
                    row = self._update(
                        conn, task_id, state=m.PENDING, attempt=row["attempt"] + 1,
                        worker_id=None, lease_id=None, lease_expires_at=None, error=text,
                        available_at=now + self._backoff(row["attempt"] + 1), updated_at=now,
                    )
                    events.append(("requeued", row))
                else:
                    row = self._update(
                        conn, task_id, state=m.FAILED, error=text, lease_expires_at=None,
                        completed_at=now, updated_at=now,
                    )
                    events.append(("failed", row))
            elif (
                row is not None
                and row["state"] == m.FAILED
                and row["lease_id"] == lease_id
                and row["error"] == text
            ):
                exc = None  # the same holder reporting the same failure again
                repeated = True
        self._emit(events)
        if exc is not None:
            raise exc
        assert row is not None
        return _repeated(row) if repeated else status_dict(row)

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a pending or claimed task (a holder's later report is refused)."""
        m.check_id(task_id)
        events: builtins.list[_Event] = []
        error: DatasetsError | None = None
        with self._write() as conn:
            now = self._clock()
            row = self._get(conn, task_id)
            if row is None:
                error = self._not_found(task_id)
            elif row["state"] in (m.PENDING, m.CLAIMED):
                row = self._update(
                    conn, task_id, state=m.CANCELLED, error="cancelled", lease_expires_at=None,
                    completed_at=now, updated_at=now,
                )
                events.append(("cancelled", row))
            elif row["state"] != m.CANCELLED:
                error = TaskStateError(
                    f"task {task_id!r} is already {row['state']}; only pending or claimed "
                    "tasks can be cancelled"
                )
        self._emit(events)
        if error is not None:
            raise error
        assert row is not None
        return status_dict(row)

    # ------------------------------------------------------------------ queries
    def status(self, task_id: str) -> dict[str, Any]:
        m.check_id(task_id)
        with self._read() as conn:
            row = self._get(conn, task_id)
        if row is None:
            raise self._not_found(task_id)
        if row["state"] == m.CLAIMED and row["lease_expires_at"] <= self._clock():
            with self._write() as conn:
                events = self._expire(conn, self._clock(), task_id)
                row = self._get(conn, task_id)
            self._emit(events)
            assert row is not None
        return status_dict(row)

    def list(self, status: str | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Tasks (optionally in one state), most recently submitted first."""
        if status is not None and status not in m.STATES:
            raise InvalidArgumentError(
                f"status must be one of {', '.join(m.STATES)} or None, got {status!r}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive integer, got {limit!r}")
        self._expire_if_due()
        if status is None:
            sql, args = f"SELECT {COLS} FROM tasks ORDER BY seq DESC LIMIT ?", (limit,)
        else:
            # Literal conditions: SQLite only uses a partial index whose WHERE clause the
            # query repeats verbatim (a bound parameter does not count).
            where = {
                m.PENDING: "INDEXED BY tasks_claimable WHERE state = 'pending'",
                m.CLAIMED: "INDEXED BY tasks_leases WHERE state = 'claimed'",
            }.get(status, "INDEXED BY tasks_done WHERE completed_at IS NOT NULL AND state = ?")
            sql = (
                f"SELECT {COLS} FROM tasks WHERE seq IN (SELECT seq FROM tasks {where} "
                "ORDER BY seq DESC LIMIT ?) ORDER BY seq DESC"
            )
            args = (status, limit) if "?" in where else (limit,)
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [status_dict(dict(zip(COL_NAMES, r, strict=True))) for r in rows]

    def list_claimable(
        self, capabilities: Any = None, limit: int = 100, p2p_only: bool = True
    ) -> builtins.list[dict[str, Any]]:
        """Open offers: claimable tasks (covered by ``capabilities`` when given), best first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgumentError(f"limit must be a positive integer, got {limit!r}")
        caps = None if capabilities is None else m.norm_capabilities(capabilities)
        self._expire_if_due()
        with self._read() as conn:
            now = self._clock()
            picked = self._pick(conn, now, caps, False, p2p_only, limit, False)
        return [offer_dict(r) for r in picked]

    def counts(self) -> dict[str, int]:
        self._expire_if_due()
        with self._read() as conn:
            found = dict(
                conn.execute(
                    "SELECT state, COUNT(*) FROM tasks INDEXED BY tasks_done "
                    "WHERE completed_at IS NOT NULL GROUP BY state"
                ).fetchall()
            )
            found[m.PENDING] = conn.execute(
                "SELECT COUNT(*) FROM tasks INDEXED BY tasks_claimable WHERE state = 'pending'"
            ).fetchone()[0]
            found[m.CLAIMED] = conn.execute(
                "SELECT COUNT(*) FROM tasks INDEXED BY tasks_leases WHERE state = 'claimed'"
            ).fetchone()[0]
        return {state: found.get(state, 0) for state in m.STATES}

    def reap_expired(self) -> builtins.list[str]:
        """Expire due leases; return ids that became claimable again since the last call.

        A requeued task waits out its backoff first, so it is reported by the call after its
        ``available_at`` has passed (the first call reports every retry that is claimable).
        """
        with self._write() as conn:
            now = self._clock()
            events = self._expire(conn, now)
            ready = [
                tid
                for (tid,) in conn.execute(
                    "SELECT task_id FROM tasks INDEXED BY tasks_retry "
                    "WHERE state = 'pending' AND attempt > 1 "
                    "AND available_at > ? AND available_at <= ? ORDER BY available_at",
                    (self._reap_mark, now),
                )
            ]
            self._reap_mark = now
            self._prune_groups(conn)
        self._emit(events)
        return ready

    @staticmethod
    def _prune_groups(conn: sqlite3.Connection) -> None:
        """Forget claim groups no open task uses, so claims keep seeking a short list."""
        groups = conn.execute("SELECT gpu_pref, requires_key FROM claim_groups").fetchall()
        live = set(
            conn.execute(
                "SELECT DISTINCT gpu_pref, requires_key FROM tasks INDEXED BY tasks_leases "
                "WHERE state = 'claimed'"
            ).fetchall()
        )
        for gpu, key in groups:
            if (gpu, key) in live:
                continue
            pending = conn.execute(
                "SELECT 1 FROM tasks INDEXED BY tasks_claimable WHERE state = 'pending' "
                "AND gpu_pref = ? AND requires_key = ? LIMIT 1",
                (gpu, key),
            ).fetchone()
            if pending is None:
                conn.execute(
                    "DELETE FROM claim_groups WHERE gpu_pref = ? AND requires_key = ?", (gpu, key)
                )
