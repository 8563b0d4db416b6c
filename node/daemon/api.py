"""The node's operations as JSON-in/JSON-out methods: one implementation for every caller.

The control API server (``node.daemon.server``) maps HTTP routes onto these methods, the CLI
calls them in-process when no daemon runs, and the worker loop uses them through either path
(``ControlClient`` in ``node.daemon.client`` has the same method names over HTTP). Keeping one
implementation means the CLI behaves the same with and without a daemon.

Every method takes and returns plain JSON values (dict, list, str, int, float, bool, None),
except the two streaming ones (``add_stream``, ``open_file``) that take/return byte streams.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from node.errors import (
    ConfigError,
    DatasetsError,
    InvalidArgumentError,
    NotFoundError,
    PathNotFoundError,
    PeerError,
)
from node.tasks.router import TaskRouter

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.daemon.settings import Settings
    from node.services import NodeServices

log = logging.getLogger("dsi.daemon")

VERSION = "0.1.0"
_STREAM_CHUNK = 1 << 20
_MAX_ASKED_PEERS = 16  # peers asked for a task whose owner this node does not know
_HELD_GRACE = 5.0  # seconds past expiry before a held lease is forgotten


def p2p_off_error(what: str) -> DatasetsError:
    return DatasetsError(
        f"{what} needs the P2P host, and P2P is off on this node; start the daemon with "
        "`dsi-node run --enable-p2p` (or set enable_p2p = true in the config file)"
    )


class NodeAPI:
    """All node operations over one ``NodeServices`` (and its P2P handle when running)."""

    def __init__(
        self,
        services: NodeServices,
        *,
        settings: Settings | None = None,
        daemon: dict[str, Any] | None = None,
    ) -> None:
        self.services = services
        self.settings = settings
        self.daemon = daemon  # pid, started_at, control_url when inside `dsi-node run`
        self._router = TaskRouter(lambda: self.services.tasks, lambda: self.p2p)
        self._listener_lock = threading.Lock()
        self._accepting = True
        self._task_event = threading.Condition()
        self._listening = False

    # ------------------------------------------------------------------ plumbing
    @property
    def cfg(self) -> NodeConfig:
        return self.services.config

    @property
    def p2p(self) -> Any | None:
        """The running P2P handle, or None (never starts one: only ``run`` does)."""
        return self.services.p2p() if self.services.p2p_running else None

    def _require_p2p(self, what: str) -> Any:
        handle = self.p2p
        if handle is None:
            raise p2p_off_error(what)
        return handle

    def _ensure_task_listener(self) -> None:
        """Wake long-polling claims when a task becomes pending (submit, requeue)."""
        with self._listener_lock:
            if self._listening:
                return
            self._listening = True

        def on_event(event: dict[str, Any]) -> None:
            if event.get("state") == "pending":
                with self._task_event:
                    self._task_event.notify_all()

        self.services.tasks.add_listener(on_event)

    def stop_accepting(self) -> None:
        """Refuse new claims (shutdown has begun); open leases may still finish."""
        self._accepting = False
        with self._task_event:
            self._task_event.notify_all()

    def held_leases(self) -> list[dict[str, Any]]:
        """Open leases handed out by ``claim``; ones long expired (their worker died) are
        dropped: the queue has already given those tasks to someone else."""
        return [
            {k: v for k, v in vars(h).items() if k != "claimed_at"}
            for h in self._router.held_leases(expired_for=_HELD_GRACE)
        ]

    def release_held_leases(self, reason: str) -> list[str]:
        """Hand back every lease still open (fail, retryable) so other workers get the tasks."""
        released = []
        for held in self.held_leases():
            try:
                self.fail(held["task_id"], held["lease_id"], reason, retryable=True,
                          worker_id=held["worker_id"])
                released.append(held["task_id"])
            except DatasetsError as exc:  # already finished, expired or owner unreachable
                log.warning("could not hand back task %s: %s", held["task_id"], exc)
                self._router.forget(held["task_id"], held["lease_id"])
        return released

    # ------------------------------------------------------------------ identity & status
    def health(self) -> dict[str, Any]:
        return {"ok": True, "peer_id": self.services.peer_id, "version": VERSION,
                "pid": os.getpid()}

    def id(self) -> dict[str, Any]:
        handle = self.p2p
        addrs = list(_call_opt(handle, "listen_addrs", default=[])) if handle else []
        return {"peer_id": self.services.peer_id, "addrs": addrs, "p2p": handle is not None}

    def status(self) -> dict[str, Any]:
        return node_status(self.services, settings=self.settings, daemon=self.daemon,
                           p2p=self.p2p)

    def peers(self) -> dict[str, Any]:
        handle = self._require_p2p("listing peers")
        st = dict(handle.status())
        mesh = set(st.get("mesh_peers") or [])
        bootstrap = {b["addr"].rsplit("/p2p/", 1)[-1]: b["addr"]
                     for b in st.get("bootstrap_peers") or [] if isinstance(b, dict)}
        peers = [{"peer_id": p, "mesh": p in mesh, "bootstrap": bootstrap.get(p)}
                 for p in st.get("connected_peers") or []]
        return {"peers": peers}

    # ------------------------------------------------------------------ storage
    def add(self, path: str, cid_version: int = 0, pin: bool = True,
            recursive: bool = True) -> dict[str, Any]:
        """Add a file or directory that this process can read (absolute path)."""
        src = Path(path).expanduser()
        if not src.is_absolute():
            raise InvalidArgumentError(f"path must be absolute for the daemon, got {path!r}")
        return self.add_local(src, cid_version=cid_version, pin=pin, recursive=recursive)

    def add_local(self, path: str | Path, cid_version: int = 0, pin: bool = True,
                  recursive: bool = True,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """``add`` with a progress callback (bytes read); in-process callers only."""
        src = Path(path).expanduser()
        if not src.exists():
            raise PathNotFoundError(f"{src} does not exist")
        blocks = self.services.blocks
        if src.is_dir():
            cid = blocks.add_directory(src, recursive=recursive, cid_version=cid_version,
                                       pin=pin, progress=progress)
            return {"cid": str(cid), "kubo": _in_kubo(cid), "type": "directory",
                    "name": src.name}
        cid = blocks.add_file(src, pin=pin, cid_version=cid_version, progress=progress)
        return {"cid": str(cid), "kubo": _in_kubo(cid), "type": "file", "name": src.name,
                "size": src.stat().st_size}

    def add_stream(self, stream: IO[bytes], length: int, cid_version: int = 0,
                   pin: bool = True, name: str = "") -> dict[str, Any]:
        """Add ``length`` bytes read from ``stream`` as one file (bounded memory).

        The bytes are spooled to a temporary file in the data directory first: the importer
        reads files, and a client that stops half-way must not leave a partial add behind.
        """
        with self._spool() as tmp:
            with tmp.open("wb") as out:
                copied = copy_stream(stream, out, length)
            if copied != length:
                raise InvalidArgumentError(f"upload ended after {copied} of {length} bytes")
            cid = self.services.blocks.add_file(tmp, pin=pin, cid_version=cid_version)
        return {"cid": str(cid), "kubo": _in_kubo(cid), "type": "file", "name": name,
                "size": length}

    @contextlib.contextmanager
    def _spool(self) -> Iterator[Path]:
        tmp_dir = self.cfg.cache_dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="spool-", dir=tmp_dir)
        os.close(fd)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def stat(self, cid: str) -> dict[str, Any]:
        """``{"cid", "type": "file"|"directory"|..., "size"}`` of a UnixFS node."""
        return dict(self.services.blocks.stat(cid))

    def open_file(self, cid: str) -> tuple[int | None, Iterator[bytes]]:
        """The bytes of a file CID as (size, chunk iterator), for streaming to a client."""
        info = self.stat(cid)
        if info.get("type") == "directory":
            raise InvalidArgumentError(
                f"{cid} is a directory; use `get` with a destination path (or `ls` it)")
        spool = self._spool()
        tmp = spool.__enter__()
        try:
            tmp.unlink()
            self.services.blocks.get_file(cid, tmp)  # every block verified on the way
        except BaseException:
            spool.__exit__(None, None, None)
            raise

        def chunks() -> Iterator[bytes]:
            try:
                with tmp.open("rb") as fh:
                    while chunk := fh.read(_STREAM_CHUNK):
                        yield chunk
            finally:
                spool.__exit__(None, None, None)

        return tmp.stat().st_size, chunks()

    def get(self, cid: str, dest: str) -> dict[str, Any]:
        """Write a file or directory to ``dest`` (absolute); a file goes into an existing
        directory as ``dest/<cid>``."""
        target = Path(dest).expanduser()
        if not target.is_absolute():
            raise InvalidArgumentError(f"dest must be absolute for the daemon, got {dest!r}")
        return self.get_local(cid, target)

    def get_local(self, cid: str, dest: str | Path,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        written = self.services.blocks.get_file(cid, Path(dest), progress=progress)
        return {"cid": cid, "dest": str(written)}

    def ls(self, cid: str) -> dict[str, Any]:
        return {"cid": cid, "entries": [dict(e) for e in self.services.blocks.ls(cid)]}

    def pin_add(self, cid: str) -> dict[str, Any]:
        kubo = self.services.blocks.pin(cid)
        return {"cid": cid, "pinned": True, "kubo": bool(kubo)}

    def pin_rm(self, cid: str) -> dict[str, Any]:
        was = self.services.blocks.unpin(cid)
        return {"cid": cid, "pinned": False, "was_pinned": bool(was)}

    def pin_ls(self) -> dict[str, Any]:
        return {"pins": [dict(p) for p in self.services.blocks.pins()]}

    # ------------------------------------------------------------------ tasks
    def submit(self, task_id: str, task_type: str, data: Any = None, priority: int = 5,
               tags: list[str] | None = None, requires: list[str] | None = None,
               max_attempts: int = 3, lease_seconds: float = 60) -> dict[str, Any]:
        """Submit a task owned by this node (idempotent by id and body).

        With P2P running, the node's queue listener announces P2P_ELIGIBLE tasks.
        """
        return self.services.tasks.submit(
            task_id, task_type, data, priority=priority, tags=tags, requires=requires,
            max_attempts=max_attempts, lease_seconds=lease_seconds,
            owner=self.services.peer_id)

    def submit_batch(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        """Submit many tasks in one transaction: all of them or, on any error, none (each
        item holds ``submit``'s fields; equal priorities run in the order given)."""
        if not isinstance(tasks, list):
            raise InvalidArgumentError("tasks must be a list of submit requests")
        return {"tasks": self.services.tasks.submit_many(tasks, owner=self.services.peer_id)}

    def tasks(self, state: str | None = None, limit: int = 100) -> dict[str, Any]:
        return {"tasks": self.services.tasks.list(state, limit=limit)}

    def task(self, task_id: str, owner: str | None = None) -> dict[str, Any]:
        """Status of a task: local; else (P2P on) asked from its owner.

        The owner is ``owner`` if given, else the one the P2P node knows (a held or claimed
        task, a current offer), else each connected peer is asked in turn: a task that was
        claimed and finished elsewhere has left this node's offer table.
        """
        handle = self.p2p
        if handle is None:
            if owner is not None:
                raise p2p_off_error("asking a task's owner")
            return self.services.tasks.status(task_id)
        if owner is not None:
            return dict(handle.portal.call(handle.node.get_task_status, task_id, owner))
        try:
            return dict(handle.get_task_status(task_id))
        except NotFoundError:
            pass
        for peer in _call_opt(handle.node, "connected_peers", default=[])[:_MAX_ASKED_PEERS]:
            try:
                return dict(handle.portal.call(handle.node.get_task_status, task_id, peer))
            except DatasetsError:
                continue
        raise NotFoundError(
            f"no task with id {task_id!r} here or at any connected peer; if another node "
            "owns it, give its peer id (dsi-node task ID --owner PEER_ID)")

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.services.tasks.cancel(task_id)

    def counts(self) -> dict[str, int]:
        return self.services.tasks.counts()

    def claim(self, worker_id: str, capabilities: list[str] | None = None,
              wait: float = 0.0) -> dict[str, Any] | None:
        """The best task for this worker (local queue and remote offers), or None.

        ``wait`` > 0 long-polls up to that many seconds (max 30) for a task to appear.
        """
        try:
            wait = max(0.0, min(float(wait), 30.0))
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"wait must be a number of seconds, got {wait!r}") from None
        if capabilities is None:
            capabilities = []
        elif not isinstance(capabilities, list):  # a bare "GPU" must not become G, P, U
            raise InvalidArgumentError(
                f"capabilities must be a list of strings, got {capabilities!r}")
        deadline = time.monotonic() + wait
        self._ensure_task_listener()
        while True:
            if not self._accepting:
                return None
            grant = self._claim_once(worker_id, capabilities)
            if grant is not None:
                return grant
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Woken by a submit/requeue in this process; other writers (processes, gossip)
            # are seen by re-checking every half second.
            with self._task_event:
                self._task_event.wait(min(remaining, 0.5))

    def _claim_once(self, worker_id: str, capabilities: list[str]) -> dict[str, Any] | None:
        grant = self._router.claim_next(worker_id, capabilities)
        if grant is None:
            return None
        grant = dict(grant)
        grant.setdefault("owner", self.services.peer_id)
        return grant

    def heartbeat(self, task_id: str, lease_id: str,
                  worker_id: str | None = None) -> dict[str, Any]:
        expires = self._router.heartbeat(task_id, lease_id, worker_id)
        return {"task_id": task_id, "lease_expires_at": expires}

    def complete(self, task_id: str, lease_id: str, result: Any = None,
                 result_cid: str | None = None,
                 worker_id: str | None = None) -> dict[str, Any]:
        return self._router.complete(task_id, result, lease_id, result_cid, worker_id)[0]

    def fail(self, task_id: str, lease_id: str, error: str, retryable: bool = True,
             worker_id: str | None = None) -> dict[str, Any]:
        return self._router.fail(task_id, error, retryable, lease_id, worker_id)[0]

    # ------------------------------------------------------------------ provenance
    def append(self, record_type: str, fields: dict[str, Any] | None = None,
               input_cid: str | None = None, output_cid: str | None = None) -> dict[str, Any]:
        if not self.cfg.enable_provenance:
            raise ConfigError(
                "provenance is disabled on this node (enable_provenance = false); enable it "
                "in the config to record executions")
        cid, ipfs = self.services.provenance.append(
            record_type, fields or {}, input_cid=input_cid, output_cid=output_cid)
        return {"cid": cid, "ipfs": ipfs}

    def logs(self, filters: dict[str, Any] | None = None, limit: int = 100,
             since: float | None = None, until: float | None = None) -> dict[str, Any]:
        from node.provenance import to_jsonable

        records = self.services.provenance.query(
            filters or {}, limit=limit, since=since, until=until)
        return {"records": [to_jsonable(r) for r in records]}

    def record(self, cid: str) -> dict[str, Any]:
        from node.provenance import to_jsonable

        return to_jsonable(self.services.provenance.get(cid))  # type: ignore[return-value]

    def verify(self, cid: str | None = None) -> dict[str, Any]:
        result = self.services.provenance.verify(cid)
        if isinstance(result, dict):
            return result
        return {"ok": bool(result), "cid": cid}


def _in_kubo(cid: Any) -> bool:
    """``StoredCID.in_kubo``: the content also reached Kubo during the call."""
    return bool(getattr(cid, "in_kubo", False))


def _call_opt(obj: Any, name: str, *, default: Any) -> Any:
    """Call an optional accessor of the P2P handle; a property works too."""
    attr = getattr(obj, name, None)
    if attr is None:
        return default
    try:
        return attr() if callable(attr) else attr
    except PeerError as exc:
        log.warning("P2P %s failed: %s", name, exc)
        return default


def node_status(services: NodeServices, *, settings: Settings | None = None,
                daemon: dict[str, Any] | None = None, p2p: Any | None = None,
                create: bool = True) -> dict[str, Any]:
    """The status document of ``dsi-node status``.

    With ``create=False`` (the CLI with no daemon) nothing is created on disk: databases that
    do not exist yet are reported as empty instead of being initialised.
    """
    cfg = services.config
    out: dict[str, Any] = {
        "version": VERSION,
        "cache_dir": str(cfg.cache_dir),
        "daemon": daemon or {"running": False},
    }
    if create or cfg.identity_path.exists():
        out["peer_id"] = services.peer_id
    else:
        out["peer_id"] = None
    storage: dict[str, Any] = {"ipfs_api": cfg.ipfs_api, "backend": "local"}
    # Each section is guarded: status is the command people run when something is wrong.
    try:
        blocks = services.blocks
        kubo = bool(blocks.kubo_available())
        storage["kubo_available"] = kubo
        if kubo:
            storage["backend"] = "local+kubo"
            info = blocks.kubo_info() or {}
            storage["kubo_agent"] = info.get("AgentVersion") or info.get("agent_version")
    except Exception as exc:
        storage["kubo_available"] = False
        storage["error"] = f"{type(exc).__name__}: {exc}"
    out["storage"] = storage
    try:
        out["tasks"] = services.tasks.counts() if create or cfg.tasks_db.exists() else {}
    except Exception as exc:
        out["tasks"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        if cfg.enable_provenance and (create or cfg.provenance_db.exists()):
            out["provenance"] = {"records": services.provenance.count()}
        else:
            out["provenance"] = {"records": 0, "enabled": cfg.enable_provenance}
    except Exception as exc:
        out["provenance"] = {"error": f"{type(exc).__name__}: {exc}"}
    p2p_info: dict[str, Any] = {"enabled": cfg.enable_p2p, "running": p2p is not None}
    if p2p is not None:
        raw = _call_opt(p2p, "status", default={}) or {}
        p2p_info.update({k: v for k, v in dict(raw).items() if k != "task_counts"})
    out["p2p"] = p2p_info
    return out


def copy_stream(src: IO[bytes], dst: IO[bytes], length: int | None) -> int:
    """Copy ``length`` bytes (or to EOF) in bounded chunks; returns the bytes copied."""
    if length is None:
        before = dst.tell() if dst.seekable() else 0
        shutil.copyfileobj(src, dst, _STREAM_CHUNK)
        return (dst.tell() - before) if dst.seekable() else 0
    remaining = length
    while remaining > 0:
        chunk = src.read(min(_STREAM_CHUNK, remaining))
        if not chunk:
            break
        dst.write(chunk)
        remaining -= len(chunk)
    return length - remaining
