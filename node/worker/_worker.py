"""The worker loop: claim -> execute -> complete, with heartbeats, provenance and drain.

A ``Worker`` runs up to ``concurrency`` handler calls at once, each in its own thread:

1. claim the best task for its capabilities (long-poll, so a new task starts at once);
2. call the handler while a heartbeat thread renews the lease every third of its length;
3. record a ``worker_execution`` provenance record (outcome, duration, error, output CID);
4. complete with ``{"status": "success", "output": <handler value>, "duration_ms", ...}``,
   or fail with the exception text (retryable unless the handler raised ``TaskFailed(...,
   retryable=False)``).

The node behind it is either the local daemon (``ControlClient``) or an in-process
``NodeAPI`` when no daemon runs. A lost lease (expired, taken over, task cancelled) sets
``ctx.cancelled``; the handler may watch it, and its result is discarded either way because
the queue's fencing refuses it. ``stop(drain=True)`` stops claiming and lets running tasks
finish; ``stop(drain=False)`` hands running tasks back (fail, retryable) and returns.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from node.errors import (
    ConfigError,
    DaemonNotRunningError,
    DatasetsError,
    InvalidArgumentError,
    LeaseError,
    NotFoundError,
    TaskStateError,
)
from protocols.codec import MAX_JSON_DEPTH, json_too_deep

log = logging.getLogger("dsi.worker")

RECORD_TYPE = "worker_execution"


class TaskFailed(Exception):
    """Raise from a handler to fail a task with this message; ``retryable=False`` ends it."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class WorkResult:
    """A handler's return value with an output CID (the task's ``result_cid``)."""

    output: Any = None
    output_cid: str | None = None


@dataclass
class TaskContext:
    """What a two-argument handler ``handler(task, ctx)`` gets besides the task."""

    task: dict[str, Any]
    worker_id: str
    cancelled: threading.Event = field(default_factory=threading.Event)
    lost_reason: str | None = None
    heartbeats: int = 0

    @property
    def task_id(self) -> str:
        return str(self.task["task_id"])

    @property
    def should_stop(self) -> bool:
        return self.cancelled.is_set()


class NodeOps(Protocol):
    """The part of ``NodeAPI`` / ``ControlClient`` a worker uses."""

    def claim(self, worker_id: str, capabilities: list[str] | None = None,
              wait: float = 0.0) -> dict[str, Any] | None: ...
    def heartbeat(self, task_id: str, lease_id: str,
                  worker_id: str | None = None) -> dict[str, Any]: ...
    def complete(self, task_id: str, lease_id: str, result: Any = None,
                 result_cid: str | None = None,
                 worker_id: str | None = None) -> dict[str, Any]: ...
    def fail(self, task_id: str, lease_id: str, error: str, retryable: bool = True,
             worker_id: str | None = None) -> dict[str, Any]: ...
    def append(self, record_type: str, fields: dict[str, Any] | None = None,
               input_cid: str | None = None,
               output_cid: str | None = None) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...


Handler = Callable[..., Any]


def load_handler(spec: str, app_dir: str | None = ".") -> Handler:
    """``"package.module:function"`` -> the function (``app_dir`` is put on ``sys.path``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgumentError(
            f"handler must be MODULE:FUNCTION (e.g. examples.echo_worker:handle), got {spec!r}")
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgumentError(
            f"cannot import handler module {module_name!r}: {exc}; run from the folder that "
            "holds it or pass --app-dir") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidArgumentError(
                f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise InvalidArgumentError(f"handler {spec!r} is not callable")
    return target


def _wants_context(handler: Handler) -> bool:
    try:
        params = [p for p in inspect.signature(handler).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerStats:
    claimed: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    handed_back: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class Worker:
    """Claim -> execute -> complete loop over a node (daemon or in-process)."""

    def __init__(
        self,
        handler: Handler,
        ops: NodeOps,
        *,
        capabilities: Sequence[str] = (),
        concurrency: int = 1,
        worker_id: str | None = None,
        poll_interval: float = 1.0,
        max_tasks: int | None = None,
        record_provenance: bool = True,
    ) -> None:
        if concurrency < 1:
            raise InvalidArgumentError(f"concurrency must be at least 1, got {concurrency}")
        if max_tasks is not None and max_tasks < 1:
            raise InvalidArgumentError(f"max_tasks must be at least 1, got {max_tasks}")
        self.handler = handler
        self.ops = ops
        self.capabilities = [c for c in capabilities if c]
        self.concurrency = concurrency
        self.worker_id = worker_id or default_worker_id()
        self.poll_interval = max(0.05, float(poll_interval))
        self.max_tasks = max_tasks
        self.record_provenance = record_provenance
        self.stats = WorkerStats()
        self._with_ctx = _wants_context(handler)
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._running: dict[str, TaskContext] = {}
        self._reporting: set[str] = set()  # tasks whose outcome is being sent right now
        self._running_lock = threading.Lock()
        self._slots = threading.Semaphore(concurrency)
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    # ---------------------------------------------------------------- control
    def stop(self, drain: bool = True) -> None:
        """Stop claiming; with ``drain=False`` also hand running tasks back at once."""
        self._stopping.set()
        if not drain:
            self._abort.set()
            for ctx in self.running():
                ctx.cancelled.set()

    def running(self) -> list[TaskContext]:
        with self._running_lock:
            return list(self._running.values())

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # ---------------------------------------------------------------- main loop
    def run(self) -> WorkerStats:
        """Run until ``stop()`` (or ``max_tasks`` claimed); returns the counters."""
        log.info("worker %s: capabilities [%s], concurrency %d", self.worker_id,
                 ", ".join(self.capabilities) or "none", self.concurrency)
        backoff = self.poll_interval
        try:
            while not self._stopping.is_set():
                if self.max_tasks is not None and self.stats.claimed >= self.max_tasks:
                    break
                if not self._slots.acquire(timeout=0.2):
                    continue
                if self._stopping.is_set():  # stop() came while waiting for a free slot
                    self._slots.release()
                    break
                try:
                    grant = self.ops.claim(self.worker_id, self.capabilities,
                                           wait=self.poll_interval)
                except DatasetsError as exc:
                    self._slots.release()
                    level = logging.WARNING if backoff >= 4 else logging.INFO
                    log.log(level, "claim failed (%s); retrying in %.1f s", exc, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                backoff = self.poll_interval
                if grant is None:
                    self._slots.release()
                    continue
                self.stats.claimed += 1
                thread = threading.Thread(target=self._run_task, args=(grant,),
                                          name=f"dsi-task-{grant['task_id']}", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()]
                self._threads.append(thread)
                thread.start()
            self._drain()
        finally:
            self._stopped.set()
        log.info("worker %s stopped: %s", self.worker_id, self.stats.as_dict())
        return self.stats

    def _drain(self) -> None:
        """Wait for running tasks; on abort hand them back instead of waiting."""
        if self.running() and not self._abort.is_set():
            if self._stopping.is_set():
                log.info("draining %d running task(s); stop again (second SIGTERM/SIGINT) "
                         "to hand them back", len(self.running()))
            else:
                log.info("max_tasks reached: waiting for %d running task(s)",
                         len(self.running()))
        while True:
            alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                return
            if self._abort.is_set():
                for ctx in self.running():
                    self._hand_back(ctx, "worker stopped before the task finished")
                # Outcomes already on their way are short API calls: let them land.
                deadline = time.monotonic() + 30
                while self._reporting_any() and time.monotonic() < deadline:
                    time.sleep(0.02)
                return
            alive[0].join(0.1)

    def _reporting_any(self) -> bool:
        with self._running_lock:
            return bool(self._reporting)

    def _hand_back(self, ctx: TaskContext, reason: str) -> None:
        with self._running_lock:
            if self._running.pop(ctx.task_id, None) is None:
                return  # finished meanwhile
        ctx.cancelled.set()
        self._send_back(ctx, reason)

    def _send_back(self, ctx: TaskContext, reason: str) -> None:
        try:
            self.ops.fail(ctx.task_id, ctx.task["lease_id"], f"{reason} ({self.worker_id})",
                          retryable=True, worker_id=self.worker_id)
            self.stats.handed_back += 1
            log.info("task %s handed back", ctx.task_id)
        except DatasetsError as exc:
            log.warning("could not hand back task %s: %s", ctx.task_id, exc)

    # ---------------------------------------------------------------- one task
    def _run_task(self, grant: dict[str, Any]) -> None:
        ctx = TaskContext(task=grant, worker_id=self.worker_id)
        if self._abort.is_set():  # aborted between the claim and this thread's start
            self._slots.release()
            self._send_back(ctx, "worker stopped before the task started")
            return
        with self._running_lock:
            self._running[ctx.task_id] = ctx
        stop_hb = threading.Event()
        hb = threading.Thread(target=self._heartbeat_loop, args=(ctx, stop_hb),
                              name=f"dsi-hb-{ctx.task_id}", daemon=True)
        hb.start()
        started = time.monotonic()
        output: Any = None
        output_cid: str | None = None
        error: str | None = None
        retryable = True
        tb = ""
        log.info("task %s (%s, attempt %s) started", ctx.task_id, grant.get("task_type"),
                 grant.get("attempt"))
        try:
            value = self.handler(grant, ctx) if self._with_ctx else self.handler(grant)
            if isinstance(value, WorkResult):
                output, output_cid = value.output, value.output_cid
            else:
                output = value
            if json_too_deep(output):
                raise TaskFailed(f"handler returned a value nested more than {MAX_JSON_DEPTH} "
                                 "levels deep (or circular)", retryable=False)
            try:
                json.dumps(output, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise TaskFailed(f"handler returned a value JSON cannot hold: {exc}",
                                 retryable=False) from None
        except TaskFailed as exc:
            error, retryable = str(exc) or type(exc).__name__, exc.retryable
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            tb = traceback.format_exc()
        finally:
            stop_hb.set()
            hb.join()
            self._slots.release()
        duration_ms = int((time.monotonic() - started) * 1000)
        with self._running_lock:
            still_ours = self._running.pop(ctx.task_id, None) is not None
            if still_ours:
                self._reporting.add(ctx.task_id)
        try:
            if not still_ours:  # handed back by an abort while the handler ran
                return
            if self._abort.is_set():  # told to stop: whatever it returned is not a result
                self._send_back(ctx, "worker stopped before the task finished")
                return
            if ctx.lost_reason is not None:
                self.stats.lost += 1
                log.warning("task %s: lease lost (%s); result discarded", ctx.task_id,
                            ctx.lost_reason)
                self._record(ctx, "lost", duration_ms, error=ctx.lost_reason)
                return
            if error is None:
                self._finish_success(ctx, output, output_cid, duration_ms)
            else:
                if tb:
                    log.warning("task %s failed: %s\n%s", ctx.task_id, error, tb.rstrip())
                else:
                    log.warning("task %s failed: %s", ctx.task_id, error)
                self._finish_failure(ctx, error, retryable, duration_ms)
        except Exception:
            log.exception("task %s: reporting the outcome failed", ctx.task_id)
        finally:
            with self._running_lock:
                self._reporting.discard(ctx.task_id)

    def _finish_success(self, ctx: TaskContext, output: Any, output_cid: str | None,
                        duration_ms: int) -> None:
        prov = self._record(ctx, "success", duration_ms, output_cid=output_cid)
        result: dict[str, Any] = {"status": "success", "output": output,
                                  "duration_ms": duration_ms, "worker_id": self.worker_id}
        if output_cid:
            result["output_cid"] = output_cid
        if prov:
            result["provenance_cid"] = prov
        try:
            self._retrying(lambda: self.ops.complete(
                ctx.task_id, ctx.task["lease_id"], result, result_cid=output_cid,
                worker_id=self.worker_id))
            self.stats.completed += 1
            log.info("task %s completed in %d ms", ctx.task_id, duration_ms)
        except (LeaseError, TaskStateError, NotFoundError) as exc:
            self.stats.lost += 1
            log.warning("task %s: completion refused (%s)", ctx.task_id, exc)

    def _finish_failure(self, ctx: TaskContext, error: str, retryable: bool,
                        duration_ms: int) -> None:
        self._record(ctx, "error", duration_ms, error=error, retryable=retryable)
        try:
            self._retrying(lambda: self.ops.fail(
                ctx.task_id, ctx.task["lease_id"], error, retryable=retryable,
                worker_id=self.worker_id))
            self.stats.failed += 1
        except (LeaseError, TaskStateError, NotFoundError) as exc:
            self.stats.lost += 1
            log.warning("task %s: failure report refused (%s)", ctx.task_id, exc)

    def _retrying(self, call: Callable[[], Any], attempts: int = 5) -> Any:
        """Retry a completion while the node is briefly unreachable (daemon restarting)."""
        delay = 0.2
        for i in range(attempts):
            try:
                return call()
            except DaemonNotRunningError:
                if i == attempts - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        return None

    def _record(self, ctx: TaskContext, outcome: str, duration_ms: int, *,
                error: str | None = None, retryable: bool | None = None,
                output_cid: str | None = None) -> str | None:
        """The provenance record of one execution (its CID), or None if it was not written."""
        if not self.record_provenance:
            return None
        grant = ctx.task
        data: dict[str, Any] = {
            "status": "completed" if outcome == "success" else (
                "failed" if outcome == "error" else "lost"),
            "outcome": outcome,
            "duration_ms": duration_ms,
            "task_type": grant.get("task_type"),
            "attempt": grant.get("attempt"),
            "capabilities": list(self.capabilities),
            "heartbeats": ctx.heartbeats,
        }
        if grant.get("owner"):
            data["owner"] = grant["owner"]
        if error is not None:
            data["error"] = error
        if retryable is not None:
            data["retryable"] = retryable
        fields = {"worker_id": self.worker_id, "task_id": ctx.task_id, "data": data}
        try:
            rec = self.ops.append(RECORD_TYPE, fields, output_cid=output_cid)
            return str(rec["cid"])
        except ConfigError as exc:  # provenance switched off on the node: stop asking
            self.record_provenance = False
            log.info("not recording executions: %s", exc)
            return None
        except DatasetsError as exc:
            log.warning("task %s: provenance record not written: %s", ctx.task_id, exc)
            return None

    # ---------------------------------------------------------------- heartbeats
    def _heartbeat_loop(self, ctx: TaskContext, stop: threading.Event) -> None:
        expires = float(ctx.task.get("lease_expires_at") or time.time() + 30)
        while True:
            interval = max(0.2, (expires - time.time()) / 3)
            if stop.wait(interval):
                return
            try:
                reply = self.ops.heartbeat(ctx.task_id, ctx.task["lease_id"],
                                           worker_id=self.worker_id)
                expires = float(reply["lease_expires_at"])
                ctx.heartbeats += 1
            except (LeaseError, TaskStateError, NotFoundError) as exc:
                ctx.lost_reason = str(exc)
                ctx.cancelled.set()
                log.warning("task %s: lease lost (%s); telling the handler to stop",
                            ctx.task_id, exc)
                return
            except DatasetsError as exc:  # node briefly unreachable: try again soon
                log.info("task %s: heartbeat failed (%s); retrying", ctx.task_id, exc)
                expires = min(expires, time.time() + 3)


def connect_ops(
    settings: Any = None, *, embed_p2p: bool | None = None
) -> tuple[NodeOps, Callable[[], None]]:
    """The node a worker should use: the running daemon, else an in-process node.

    ``settings``: a ``node.daemon.Settings``, or a dict of setting names (``cache_dir``,
    ``enable_p2p``, ...) resolved like the CLI's flags, or None for the defaults.
    Returns ``(ops, close)``. In-process with ``enable_p2p`` (or ``embed_p2p=True``) the
    worker runs its own P2P host and takes the data directory's daemon lock, so a
    ``dsi-node run`` started later on the same directory refuses instead of creating a
    second host with the same peer id.
    """
    from node.daemon.api import NodeAPI
    from node.daemon.client import ControlClient
    from node.daemon.lock import DaemonLock
    from node.daemon.settings import Settings, load_settings
    from node.services import acquire_services, release_services

    if not isinstance(settings, Settings):
        settings = load_settings(dict(settings or {}))
    cfg = settings.node
    client = ControlClient.connect(cfg)
    if client is not None:
        log.info("using the daemon at %s", client.url)
        return client, lambda: None
    want_p2p = cfg.enable_p2p if embed_p2p is None else embed_p2p
    lock = DaemonLock(cfg.daemon_lock, role="worker") if want_p2p else None
    if lock is not None:
        lock.acquire()
    services = acquire_services(cfg)
    if want_p2p:
        services.p2p()
    log.info("no daemon on %s: running an in-process node%s", cfg.cache_dir,
             " with its own P2P host" if want_p2p else " (local tasks only)")

    def close() -> None:
        release_services(services)
        if lock is not None:
            lock.release()

    return NodeAPI(services, settings=settings), close


def serve(
    handler: Handler | str,
    settings: Any = None,
    *,
    install_signals: bool = True,
    on_start: Callable[[Worker], None] | None = None,
    **worker_kwargs: Any,
) -> WorkerStats:
    """Run a worker until SIGTERM/SIGINT (or ``max_tasks``): the embedding entry point.

    ``handler`` is a callable or a ``"module:function"`` string. The first signal drains
    (no new claims, running tasks finish); a second one hands running tasks back and returns.
    ``worker_kwargs`` go to ``Worker`` (capabilities, concurrency, worker_id, ...).
    """
    if isinstance(handler, str):
        handler = load_handler(handler)
    ops, close = connect_ops(settings)
    try:
        worker = Worker(handler, ops, **worker_kwargs)
        restore: list[tuple[int, Any]] = []
        if install_signals and threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, frame: object) -> None:
                drain = not worker.stopping
                log.info("%s: %s", signal.Signals(signum).name,
                         "draining" if drain else "handing running tasks back")
                worker.stop(drain=drain)

            for sig in (signal.SIGTERM, signal.SIGINT):
                restore.append((sig, signal.signal(sig, on_signal)))
        try:
            if on_start is not None:
                on_start(worker)
            return worker.run()
        finally:
            for sig, previous in restore:
                signal.signal(sig, previous)
    finally:
        with contextlib.suppress(Exception):
            close()
