"""Worker mode: run ipfs_accelerate work from the dsi task queue.

``dsi-node worker --handler MODULE:FUNCTION`` on the command line, or from Python::

    from node.worker import serve
    serve("my_pkg.tasks:handle", capabilities=["GPU", "CUDA"], concurrency=2)

A handler is ``handler(task)`` or ``handler(task, ctx)``: ``task`` is the claim grant
(``task_id``, ``task_type``, ``data``, ``attempt``, ...), ``ctx.cancelled`` is set when the
lease is lost or the worker aborts. Return a JSON value (or ``WorkResult(output,
output_cid)``); raise to fail the task (``TaskFailed(msg, retryable=False)`` to end it).
"""

from node.worker._worker import (
    RECORD_TYPE,
    TaskContext,
    TaskFailed,
    Worker,
    WorkerStats,
    WorkResult,
    connect_ops,
    default_worker_id,
    load_handler,
    serve,
)

__all__ = [
    "RECORD_TYPE",
    "TaskContext",
    "TaskFailed",
    "WorkResult",
    "Worker",
    "WorkerStats",
    "connect_ops",
    "default_worker_id",
    "load_handler",
    "serve",
]
