"""The durable local task queue (SQLite): leases, retries, fencing and capability matching.

``TaskQueue(db_path)`` is the only class; its module documentation (``node.tasks._queue``)
states the exact claim order, the GPU_PREFERRED rule, lease/backoff arithmetic and fencing.
"""

from node.tasks._model import (
    CANCELLED,
    CLAIMED,
    COMPLETED,
    FAILED,
    GPU_CAPABILITIES,
    PENDING,
    STATES,
    TAG_GPU_PREFERRED,
    TAG_P2P_ELIGIBLE,
    TERMINAL_STATES,
    is_gpu_worker,
    norm_capabilities,
)
from node.tasks._queue import QueueBusy, TaskQueue

__all__ = [
    "CANCELLED",
    "CLAIMED",
    "COMPLETED",
    "FAILED",
    "GPU_CAPABILITIES",
    "PENDING",
    "STATES",
    "TAG_GPU_PREFERRED",
    "TAG_P2P_ELIGIBLE",
    "TERMINAL_STATES",
    "QueueBusy",
    "TaskQueue",
    "is_gpu_worker",
    "norm_capabilities",
]
