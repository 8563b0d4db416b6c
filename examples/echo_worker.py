"""A runnable example worker: how to embed dsi in an ipfs_accelerate worker.

Run it against the local node (the daemon if one runs, else an in-process node)::

    dsi-node worker --handler examples.echo_worker:handle --capabilities CPU -n 2
    # or, the same through the Python API:
    python examples/echo_worker.py --capabilities CPU --concurrency 2

and give it work::

    dsi-node submit --type wordcount --data '{"text": "to be or not to be"}'
    dsi-node submit --type sleep --data '{"seconds": 5}'

Task types it knows: ``echo`` (returns the data), ``wordcount`` (counts words of
``data["text"]``), ``sleep`` (sleeps ``data["seconds"]``, stopping early when the lease is
lost), ``fail`` (raises, to see retries), ``fail_permanently`` (fails without retry).
A real worker would load a model here and return the output's CID (``WorkResult``).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

from node.worker import TaskContext, TaskFailed


def handle(task: dict[str, Any], ctx: TaskContext) -> Any:
    """One task in, a JSON value out. Raising fails the task with the exception text."""
    kind, data = task["task_type"], task.get("data") or {}
    if kind == "echo":
        return data
    if kind == "wordcount":
        words = str(data.get("text", "")).split()
        return {"words": len(words), "top": Counter(words).most_common(3)}
    if kind == "sleep":
        deadline = time.monotonic() + float(data.get("seconds", 1))
        while time.monotonic() < deadline:
            if ctx.cancelled.wait(0.05):  # lease lost or worker aborting: stop early
                return {"slept": False}
        return {"slept": float(data.get("seconds", 1)), "heartbeats": ctx.heartbeats}
    if kind == "fail":
        raise RuntimeError(data.get("message", "this task always fails"))
    if kind == "fail_permanently":
        raise TaskFailed(data.get("message", "bad input, retrying will not help"),
                         retryable=False)
    raise TaskFailed(f"unknown task type {kind!r}", retryable=False)


def main() -> None:
    from node.daemon.runner import configure_logging
    from node.worker import serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", default="CPU")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    configure_logging("info")
    stats = serve(handle, {"cache_dir": args.cache_dir},
                  capabilities=args.capabilities.split(","), concurrency=args.concurrency)
    print(stats.as_dict())


if __name__ == "__main__":
    main()
