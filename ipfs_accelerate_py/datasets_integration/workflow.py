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
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from node.errors import DatasetsError
from node.tasks.router import HeldLease, TaskRouter

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


class WorkflowCoordinator(Facade):
    """Task coordination for workers (``WorkflowCoordinator(config=None, **kw)``)."""

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        # Routes each call (local queue or P2P node) and remembers the leases granted to this
        # object, so callers may omit lease_id.
        self._router = TaskRouter(lambda: self.services.tasks, self._p2p)

    @property
    def tasks(self) -> TaskQueue:
        """The node's local queue (also reachable for advanced use: listeners, counts)."""
        return self.services.tasks

    def _p2p(self) -> P2PHandle | None:
        """The P2P handle when ``enable_p2p`` is on (started on first use), else None."""
        return self.services.p2p() if self.config.enable_p2p else None

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

    def submit_tasks(self, tasks: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Queue many tasks at once: each item holds ``submit_task``'s arguments by name.

        One transaction: all are queued or, on any error (e.g. an id already used with
        another body), none. Equal priorities run in the order given. Much faster than a
        loop of ``submit_task`` for big batches; at most 10,000 per call. Returns the
        statuses in the order given.
        """
        statuses = self.tasks.submit_many(tasks)
        self._p2p()  # with P2P on, make sure the node runs so the tasks get announced
        return statuses

    def get_next_task(
        self, worker_id: str, capabilities: list[str] | None = None
    ) -> dict[str, Any] | None:
        """Claim the best task for this worker, or None (``capabilities`` default: config)."""
        caps = list(self.config.capabilities) if capabilities is None else capabilities
        return self._router.claim_next(worker_id, caps)

    def heartbeat(self, task_id: str, lease_id: str | None = None) -> float:
        """Renew the lease; returns the new expiry (unix seconds)."""
        return self._router.heartbeat(task_id, lease_id)

    def complete_task(
        self,
        task_id: str,
        result: Any,
        lease_id: str | None = None,
        result_cid: str | None = None,
    ) -> dict[str, Any]:
        """Finish a task with a JSON result (and the CID of a larger output, if any)."""
        status, held = self._router.complete(task_id, result, lease_id, result_cid)
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
        status, held = self._router.fail(task_id, error, retryable, lease_id)
        status["provenance_cid"] = self._record_execution(status, held, "failed", None, error)
        return status

    def cancel_task(self, task_id: str) -> dict[str, Any]:
        """Cancel a pending or claimed local task."""
        return self.tasks.cancel(task_id)

    def get_task_status(self, task_id: str) -> dict[str, Any]:
        """Status dict: status, attempt, worker_id, result, error, timestamps, ..."""
        return self._router.status(task_id)

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
            "leases_held": len(self._router.held_leases()),
        }
        if self.config.enable_p2p:
            out["p2p"] = self.services.p2p().status()
        return out

    # ------------------------------------------------------------------ provenance
    def _first_record(self, task_id: str, outcome: str) -> str | None:
        """The newest worker_execution record of ``task_id`` with this outcome, if any."""
        records = self.services.provenance.query(
            {"type": "worker_execution", "task_id": task_id}, 100
        )
        for record in records:
            if isinstance(record.get("data"), dict) and record["data"].get("status") == outcome:
                return str(record["cid"])
        return None

    def _record_execution(
        self,
        status: dict[str, Any],
        held: HeldLease | None,
        outcome: str,
        result: Any,
        error: Any = None,
    ) -> str | None:
        """Append a worker_execution record; a provenance failure never undoes the task.

        A repeated report (the queue accepted the same completion or failure again) writes
        nothing: the answer is the record written the first time."""
        if not self.config.enable_provenance:
            return None
        if status.get("repeated"):
            return self._first_record(status["task_id"], outcome)
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
