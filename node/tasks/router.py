"""``TaskRouter``: one front for claiming and finishing tasks, local or remote.

Both the Python facade (``WorkflowCoordinator``) and the daemon's control API hand tasks to
workers. Each owns one router, which

* sends every call to the right place: the local ``TaskQueue``, or -- when the P2P node runs --
  the node's handle, which weighs local tasks and remote offers together and routes a remote
  task's heartbeat, complete, fail and status to its owner;
* remembers the leases it granted (task id -> lease, worker, expiry, claim time), so a caller
  may omit the lease id it was given, the daemon can hand back open leases when it stops, and
  a finished lease is forgotten whichever way it ended.

The P2P handle is looked up on every call through ``p2p`` (it may start or stop meanwhile).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.errors import LeaseError, NotFoundError, TaskStateError

if TYPE_CHECKING:
    from node.p2p.portal import P2PHandle
    from node.tasks._queue import TaskQueue

# A lease error means the lease is gone for good: the router forgets it.
_LEASE_GONE = (LeaseError, TaskStateError, NotFoundError)


@dataclass
class HeldLease:
    """A lease this router granted that has not been completed or failed yet."""

    task_id: str
    lease_id: str
    worker_id: str
    remote: bool
    expires_at: float  # unix seconds; renewed by heartbeats
    claimed_at: float


class TaskRouter:
    def __init__(self, queue: Callable[[], TaskQueue], p2p: Callable[[], P2PHandle | None]):
        self._queue = queue
        self._p2p = p2p
        self._held: dict[str, HeldLease] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ leases held
    def held(self, task_id: str) -> HeldLease | None:
        with self._lock:
            return self._held.get(task_id)

    def held_leases(self, *, expired_for: float | None = None) -> list[HeldLease]:
        """Open leases; with ``expired_for``, first forget those expired longer than that
        (their worker died: the queue has given those tasks to someone else)."""
        with self._lock:
            if expired_for is not None:
                cutoff = time.time() - expired_for
                for tid in [t for t, h in self._held.items() if h.expires_at < cutoff]:
                    del self._held[tid]
            return list(self._held.values())

    def forget(self, task_id: str, lease_id: str | None) -> None:
        with self._lock:
            held = self._held.get(task_id)
            if held is not None and held.lease_id == lease_id:
                del self._held[task_id]

    def _lease(self, task_id: str, lease_id: str | None) -> tuple[str | None, HeldLease | None]:
        """(lease id to present, our record of it): ``lease_id`` defaults to the one held."""
        held = self.held(task_id)
        if lease_id is None:
            return (held.lease_id if held else None), held
        return lease_id, (held if held is not None and held.lease_id == lease_id else None)

    def _require(self, task_id: str, lease_id: str | None) -> str:
        if lease_id is None:
            self._queue().status(task_id)  # NotFoundError for an unknown id comes first
            raise LeaseError(
                f"no lease on task {task_id!r} was granted through this client; pass the "
                "lease_id returned by the claim"
            )
        return lease_id

    # ------------------------------------------------------------------ calls
    def claim_next(self, worker_id: str, capabilities: list[str]) -> dict[str, Any] | None:
        """The best task for this worker (local queue and, with P2P, remote offers)."""
        handle = self._p2p()
        if handle is not None:
            grant = handle.get_next_task(worker_id, capabilities)
        else:
            grant = self._queue().claim_next(worker_id, capabilities)
        if grant is not None:
            now = time.time()
            with self._lock:
                self._held[grant["task_id"]] = HeldLease(
                    grant["task_id"], grant["lease_id"], grant.get("worker_id") or worker_id,
                    bool(grant.get("remote")),
                    float(grant.get("lease_expires_at") or now + 60), now,
                )
        return grant

    def heartbeat(
        self, task_id: str, lease_id: str | None = None, worker_id: str | None = None
    ) -> float:
        """Renew the lease; returns the new expiry (unix seconds)."""
        lease_id, held = self._lease(task_id, lease_id)
        worker_id = worker_id or (held.worker_id if held else None)
        handle = self._p2p()
        try:
            if handle is not None:
                expires = handle.heartbeat(task_id, lease_id, worker_id)
            else:
                lease = self._require(task_id, lease_id)
                expires = self._queue().heartbeat(task_id, lease, worker_id=worker_id)
        except _LEASE_GONE:
            self.forget(task_id, lease_id)
            raise
        if held is not None:
            held.expires_at = float(expires)
        return float(expires)

    def complete(
        self,
        task_id: str,
        result: Any,
        lease_id: str | None = None,
        result_cid: str | None = None,
        worker_id: str | None = None,
    ) -> tuple[dict[str, Any], HeldLease | None]:
        """Finish the task: ``(status, the lease as held)``."""
        return self._finish(
            task_id, lease_id, worker_id,
            lambda h, lease, worker: h.complete_task(task_id, result, lease, result_cid, worker),
            lambda q, lease, worker: q.complete(task_id, lease, result, result_cid,
                                                worker_id=worker),
        )

    def fail(
        self,
        task_id: str,
        error: Any,
        retryable: bool = True,
        lease_id: str | None = None,
        worker_id: str | None = None,
    ) -> tuple[dict[str, Any], HeldLease | None]:
        """Report a failed attempt: ``(status, the lease as held)``."""
        return self._finish(
            task_id, lease_id, worker_id,
            lambda h, lease, worker: h.fail_task(task_id, error, retryable, lease, worker),
            lambda q, lease, worker: q.fail(task_id, lease, error, retryable, worker_id=worker),
        )

    def _finish(
        self,
        task_id: str,
        lease_id: str | None,
        worker_id: str | None,
        remote: Callable[[P2PHandle, str | None, str | None], dict[str, Any]],
        local: Callable[[TaskQueue, str, str | None], dict[str, Any]],
    ) -> tuple[dict[str, Any], HeldLease | None]:
        """Complete or fail through the P2P node or the queue, then forget the lease (also
        when it turns out to be gone)."""
        lease_id, held = self._lease(task_id, lease_id)
        worker_id = worker_id or (held.worker_id if held else None)
        handle = self._p2p()
        try:
            if handle is not None:
                status = remote(handle, lease_id, worker_id)
            else:
                status = local(self._queue(), self._require(task_id, lease_id), worker_id)
        except _LEASE_GONE:
            self.forget(task_id, lease_id)
            raise
        self.forget(task_id, lease_id)
        return dict(status), held

    def status(self, task_id: str) -> dict[str, Any]:
        """Status of a local task, or (with P2P) of a remote one known to the node."""
        handle = self._p2p()
        if handle is not None:
            return dict(handle.get_task_status(task_id))
        return self._queue().status(task_id)
