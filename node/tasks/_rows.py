"""Rows of the ``tasks`` table and the dicts the queue hands out (status, grant, offer, event).

Kept apart from the queue logic: these shapes are part of the public contract (the P2P layer,
the daemon's JSON API and the facade all pass them on), so they are defined in one place.
"""

from __future__ import annotations

import json
from typing import Any

from node.tasks import _model as m

# Columns of a full row, in the order of COL_NAMES.
COLS = (
    "seq, task_id, task_type, data, priority, tags, requires, requires_key, gpu_pref, p2p, "
    "max_attempts, lease_seconds, owner, body_hash, state, attempt, worker_id, lease_id, "
    "lease_expires_at, expired_leases, available_at, result, result_cid, error, "
    "submitted_at, claimed_at, completed_at, updated_at"
)
COL_NAMES = tuple(c.strip() for c in COLS.split(","))
EMPTY_ROW: dict[str, Any] = dict.fromkeys(COL_NAMES)


def row_dict(row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    """A ``SELECT {COLS}`` result row as a dict (None stays None)."""
    return dict(zip(COL_NAMES, row, strict=True)) if row is not None else None


def status_dict(row: dict[str, Any]) -> dict[str, Any]:
    """``TaskQueue.status``: everything about a task except its lease id (the holder's
    secret)."""
    return {
        "task_id": row["task_id"],
        "task_type": row["task_type"],
        "status": row["state"],
        "priority": row["priority"],
        "tags": m.json_list(row["tags"]),
        "requires": m.json_list(row["requires"]),
        "data": json.loads(row["data"]),
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "lease_seconds": float(row["lease_seconds"]),
        "worker_id": row["worker_id"],
        "lease_expires_at": row["lease_expires_at"],
        "available_at": row["available_at"],
        "result": json.loads(row["result"]) if row["result"] is not None else None,
        "result_cid": row["result_cid"],
        "error": row["error"],
        "owner": row["owner"],
        "submitted_at": row["submitted_at"],
        "claimed_at": row["claimed_at"],
        "completed_at": row["completed_at"],
        "updated_at": row["updated_at"],
    }

def event_dict(name: str, row: dict[str, Any]) -> dict[str, Any]:
    """What listeners get after a committed change (``name`` is the kind of change)."""
    return {
        "event": name,
        "task_id": row["task_id"],
        "state": row["state"],
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "worker_id": row["worker_id"],
        "tags": m.json_list(row["tags"]),
        "priority": row["priority"],
        "task_type": row["task_type"],
        "requires": m.json_list(row["requires"]),
        "submitted_at": row["submitted_at"],
        "owner": row["owner"],
        "error": row["error"],
        "available_at": row["available_at"],
        "lease_expires_at": row["lease_expires_at"],
    }

def grant_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A claim: the task, its lease id and the lease expiry (unix seconds)."""
    return {
        "task_id": row["task_id"],
        "task_type": row["task_type"],
        "data": json.loads(row["data"]),
        "priority": row["priority"],
        "tags": m.json_list(row["tags"]),
        "requires": m.json_list(row["requires"]),
        "attempt": row["attempt"],
        "max_attempts": row["max_attempts"],
        "lease_id": row["lease_id"],
        "lease_expires_at": row["lease_expires_at"],
        "lease_seconds": float(row["lease_seconds"]),
        "worker_id": row["worker_id"],
        "owner": row["owner"],
        "submitted_at": row["submitted_at"],
    }

def offer_dict(row: dict[str, Any]) -> dict[str, Any]:
    """A claimable task as offered to peers (no data: that comes with the grant)."""
    return {
        "task_id": row["task_id"],
        "task_type": row["task_type"],
        "priority": row["priority"],
        "tags": m.json_list(row["tags"]),
        "requires": m.json_list(row["requires"]),
        "attempt": row["attempt"],
        "owner": row["owner"],
        "submitted_at": row["submitted_at"],
    }
