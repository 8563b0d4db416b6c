"""``WorkflowCoordinator``: submit, claim and finish tasks through the node's durable queue.

Locally (``enable_p2p`` off, the default) every call goes to the node's ``TaskQueue``
(``node.tasks``), a SQLite file under ``cache_dir`` shared safely by threads, coordinator
objects and processes. The queue's documentation states the claim order, the GPU_PREFERRED
rule, leases, retries and fencing; in short:

* ``submit_task`` is idempotent by id and body; the same id with another body is a
  ``ConflictError``.
* ``get_next_task`` returns a lease (``lease_id``, ``lease_expires_at``) or None. Keep the lease
  alive with ``heartbeat`` for long work; an expired lease sends the task back to the queue.
* ``complete_task`` / ``fail_task`` / ``heartbeat`` need the lease: pass ``lease_id``, or omit it
  when this same coordinator object claimed the task (it remembers the leases it was granted).
* Unknown task ids raise ``NotFoundError``.

With ``enable_p2p`` the same calls go through the node's P2P handle (``services.p2p()``), which
weighs local tasks and remote offers together and routes a remote task's heartbeat, complete,
fail and status to its owner; the local queue still arbitrates every local task.

Provenance: with ``enable_provenance`` (the default) ``complete_task`` and ``fail_task`` append a
``worker_execution`` record (worker, task, outcome, duration) whose ``output_cid`` links the
result CID, so ``ProvenanceLogger.get_lineage`` leads from a result back to the task that made
it. The record's CID is returned as ``provenance_cid`` in the status dict.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from node.errors import DatasetsError, LeaseError

from ._facade import Facade

if TYPE_CHECKING:
    from node.p2p.portal import P2PHandle
    from node.tasks import TaskQueue

log = logging.getLogger(__name__)


def _cid_or_none(value: Any) -> str | None:
    """``value`` if it is a valid CID string, else None (seed results carry placeholders)."""
    if not isinstance(value, str):
        return None
    from node.storage import is_cid

    return value if is_cid(value) else None


class _Lease:
    __slots__ = ("claimed_at", "lease_id", "worker_id")

    def __init__(self, lease_id: str, worker_id: str, claimed_at: float) -> None:
        self.lease_id = lease_id
        self.worker_id = worker_id
        self.claimed_at = claimed_at


class WorkflowCoordinator(Facade):
    """Task coordination for workers (``WorkflowCoordinator(config=None, **kw)``)."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # Leases granted to this object, so callers may omit lease_id (task_id -> lease).
        self._leases: dict[str, _Lease] = {}
        self._leases_lock = threading.Lock()

    # ------------------------------------------------------------------ routing
    @property
    def tasks(self) -> TaskQueue:
        """The node's local queue (also reachable for advanced use: listeners, counts)."""
        return self.services.tasks

    def _p2p(self) -> P2PHandle | None:
        """The P2P handle when ``enable_p2p`` is on (started on first use), else None."""
        return self.services.p2p() if self.config.enable_p2p else None

    def _remember(self, grant: dict[str, Any] | None, worker_id: str) -> None:
        if grant is not None:
            with self._leases_lock:
                self._leases[grant["task_id"]] = _Lease(
                    grant["lease_id"], grant.get("worker_id") or worker_id, time.time()
                )

    def _held(self, task_id: str, lease_id: str | None) -> tuple[str | None, _Lease | None]:
        """(lease id to present, our record of it) -- ``lease_id`` defaults to ours."""
        with self._leases_lock:
            held = self._leases.get(task_id)
        if lease_id is None:
            return (held.lease_id if held else None), held
        return lease_id, (held if held is not None and held.lease_id == lease_id else None)

    def _require_lease(self, task_id: str, lease_id: str | None) -> None:
        if lease_id is None:
            self.get_task_status(task_id)  # NotFoundError for an unknown id comes first
            raise LeaseError(
                f"this coordinator holds no lease on task {task_id!r}; pass the lease_id "
                "returned by get_next_task"
            )

    def _forget(self, task_id: str, lease_id: str | None) -> None:
        with self._leases_lock:
            held = self._leases.get(task_id)
            if held is not None and held.lease_id == lease_id:
                del self._leases[task_id]

    # ------------------------------------------------------------------ the seed's calls
    def submit_task(
        self,
        task_id: str,
        task_type: str,
        data: Any,
        priority: int = 5,
        tags: list[str] | None = None,
        requires: list[str] | None = None,
        max_attempts: int = 3,
        lease_seconds: float = 60,
    ) -> dict[str, Any]:
        """Queue a task (idempotent by id and body); returns its status dict."""
        status = self.tasks.submit(
            task_id, task_type, data, priority=priority, tags=tags, requires=requires,
            max_attempts=max_attempts, lease_seconds=lease_seconds,
        )
        self._p2p()  # with P2P on, make sure the node runs so the task gets announced
        return status

    def get_next_task(
        self, worker_id: str, capabilities: list[str] | None = None
    ) -> dict[str, Any] | None:
        """Claim the best task for this worker, or None (``capabilities`` default: config)."""
        caps = list(self.config.capabilities) if capabilities is None else capabilities
        p2p = self._p2p()
        if p2p is not None:
            grant = p2p.get_next_task(worker_id, caps)
        else:
            grant = self.tasks.claim_next(worker_id, caps)
        self._remember(grant, worker_id)
        return grant

    def heartbeat(self, task_id: str, lease_id: str | None = None) -> float:
        """Renew the lease; returns the new expiry (unix seconds)."""
        lease_id, held = self._held(task_id, lease_id)
        p2p = self._p2p()
        worker = held.worker_id if held else None
        if p2p is not None:
            return p2p.heartbeat(task_id, lease_id, worker)
        self._require_lease(task_id, lease_id)
        assert lease_id is not None
        return self.tasks.heartbeat(task_id, lease_id, worker_id=worker)

    def complete_task(
        self,
        task_id: str,
        result: Any,
        lease_id: str | None = None,
        result_cid: str | None = None,
    ) -> dict[str, Any]:
        """Finish a task with a JSON result (and the CID of a larger output, if any)."""
        lease_id, held = self._held(task_id, lease_id)
        worker = held.worker_id if held else None
        p2p = self._p2p()
        if p2p is not None:
            status = p2p.complete_task(task_id, result, lease_id, result_cid, worker)
        else:
            self._require_lease(task_id, lease_id)
            assert lease_id is not None
            status = self.tasks.complete(task_id, lease_id, result, result_cid, worker_id=worker)
        self._forget(task_id, lease_id)
        status["provenance_cid"] = self._record_execution(status, held, "completed", result)
        return status

    def fail_task(
        self,
        task_id: str,
        error: Any,
        retryable: bool = True,
        lease_id: str | None = None,
    ) -> dict[str, Any]:
        """Report a failed attempt; retried with backoff while attempts remain."""
        lease_id, held = self._held(task_id, lease_id)
        worker = held.worker_id if held else None
        p2p = self._p2p()
        if p2p is not None:
            status = p2p.fail_task(task_id, error, retryable, lease_id, worker)
        else:
            self._require_lease(task_id, lease_id)
            assert lease_id is not None
            status = self.tasks.fail(task_id, lease_id, error, retryable, worker_id=worker)
        self._forget(task_id, lease_id)
        status["provenance_cid"] = self._record_execution(status, held, "failed", None, error)
        return status

    def cancel_task(self, task_id: str) -> dict[str, Any]:
        """Cancel a pending or claimed local task."""
        return self.tasks.cancel(task_id)

    def get_task_status(self, task_id: str) -> dict[str, Any]:
        """Status dict: status, attempt, worker_id, result, error, timestamps, ..."""
        p2p = self._p2p()
        if p2p is not None:
            return p2p.get_task_status(task_id)
        return self.tasks.status(task_id)

    def list_tasks(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Local tasks, optionally in one state, most recently submitted first."""
        return self.tasks.list(status, limit=limit)

    def get_status(self) -> dict[str, Any]:
        """Task counts by state and how this coordinator is set up."""
        out: dict[str, Any] = {
            "tasks": self.tasks.counts(),
            "enable_p2p": self.config.enable_p2p,
            "enable_provenance": self.config.enable_provenance,
            "capabilities": list(self.config.capabilities),
            "leases_held": len(self._leases),
        }
        if self.config.enable_p2p:
            out["p2p"] = self.services.p2p().status()
        return out

    # ------------------------------------------------------------------ provenance
    def _record_execution(
        self,
        status: dict[str, Any],
        held: _Lease | None,
        outcome: str,
        result: Any,
        error: Any = None,
    ) -> str | None:
        """Append a worker_execution record; a provenance failure never undoes the task."""
        if not self.config.enable_provenance:
            return None
        data: dict[str, Any] = {
            "status": outcome,
            "task_type": status.get("task_type"),
            "attempt": status.get("attempt"),
            "task_status": status.get("status"),
        }
        if held is not None:
            data["duration_ms"] = round((time.time() - held.claimed_at) * 1000, 3)
        if result is not None:
            data["result"] = result
        if error is not None:
            data["error"] = error if isinstance(error, str) else repr(error)
        if status.get("owner"):
            data["owner"] = status["owner"]
        task_data = status.get("data")
        input_cid = (
            _cid_or_none(task_data.get("input_cid")) if isinstance(task_data, dict) else None
        )
        output_cid = status.get("result_cid") or (
            _cid_or_none(result.get("output_cid")) if isinstance(result, dict) else None
        )
        fields = {
            "worker_id": (held.worker_id if held else None) or status.get("worker_id"),
            "task_id": status["task_id"],
            "data": data,
        }
        try:
            cid, _reached_kubo = self.services.provenance.append(
                "worker_execution", fields, input_cid=input_cid, output_cid=output_cid
            )
        except DatasetsError as exc:
            log.warning(
                "task %s is %s, but its provenance record could not be written: %s",
                status["task_id"], status.get("status"), exc,
            )
            return None
        return cid
