"""Client of the control API, with the same method names as ``NodeAPI``.

It finds the daemon through ``<cache_dir>/control.json`` (written by ``dsi-node run`` once it
listens; it names the URL, pid and peer id) and reads the token from ``control.token``.
Uses ``http.client`` from the standard library: the CLI starts faster than with httpx and
streaming a file up or down needs nothing more. Errors come back as the same exception
classes the in-process call would raise (``node.errors``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit

from node import errors
from node.config import NodeConfig
from node.daemon.settings import control_file_path

_CHUNK = 1 << 20


def read_control_file(cfg: NodeConfig) -> dict[str, Any] | None:
    """The published daemon record, or None when no daemon has published one."""
    try:
        info = json.loads(control_file_path(cfg).read_text("utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("url"), str) else None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def no_daemon_error(cfg: NodeConfig, what: str = "this command") -> errors.DaemonNotRunningError:
    return errors.DaemonNotRunningError(
        f"{what} needs a running daemon and none is running on {cfg.cache_dir}; start one "
        f"with `dsi-node run` (add --enable-p2p for peers), e.g. "
        f"`dsi-node --cache-dir {cfg.cache_dir} run --enable-p2p`"
    )


def rebuild_error(status: int, payload: Any) -> errors.DatasetsError:
    """The exception a JSON error body describes (same class as in-process when known)."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return errors.DatasetsError(f"control API answered HTTP {status}: {payload!r}")
    name, message = str(err.get("type", "")), str(err.get("message", ""))
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.DatasetsError)):
        if status == 401:
            return errors.DatasetsError(f"control API refused the token: {message}")
        return errors.DatasetsError(f"control API answered HTTP {status} ({name}): {message}")
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    for attr in ("cid", "detail"):
        if attr in err:
            setattr(exc, attr, err[attr])
    return exc


class ControlClient:
    """Talks to the daemon of ``cfg.cache_dir``; ``connect()`` returns None if none runs."""

    def __init__(self, cfg: NodeConfig, url: str, token: str, timeout: float = 60.0) -> None:
        self.cfg = cfg
        self.url = url
        self.token = token
        self.timeout = timeout
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80

    @classmethod
    def connect(cls, cfg: NodeConfig, timeout: float = 60.0) -> ControlClient | None:
        """A client for the running daemon, or None. Verifies it answers with our token."""
        info = read_control_file(cfg)
        if info is None or not _pid_alive(info.get("pid")):
            return None
        try:
            token = cfg.control_token_path.read_text("utf-8").strip()
        except OSError as exc:
            raise errors.DatasetsError(
                f"a daemon runs on {cfg.cache_dir} but its token {cfg.control_token_path} "
                f"cannot be read ({exc}); run the CLI as the daemon's user"
            ) from None
        client = cls(cfg, info["url"], token, timeout)
        try:
            health = client.health()
        except errors.DaemonNotRunningError:
            return None
        if health.get("pid") != info.get("pid"):
            return None  # a stale file whose port now belongs to another daemon
        return client

    # ---------------------------------------------------------------- transport
    def _conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self._host, self._port,
                                          timeout=timeout or self.timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        headers.update(extra or {})
        return headers

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        data = json.dumps(body).encode() if body is not None else None
        headers = self._headers({"Content-Type": "application/json"} if data else None)
        conn = self._conn(timeout)
        try:
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                    http.client.RemoteDisconnected) as exc:
                raise errors.DaemonNotRunningError(
                    f"the daemon on {self.cfg.cache_dir} does not answer at {self.url} "
                    f"({exc}); is `dsi-node run` still running?") from None
            except TimeoutError:
                raise errors.DatasetsError(
                    f"the daemon at {self.url} did not answer {method} {path} in time") from None
        finally:
            conn.close()
        return self._decode(resp.status, raw)

    @staticmethod
    def _decode(status: int, raw: bytes) -> Any:
        try:
            payload = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            payload = raw[:200].decode("utf-8", "replace")
        if status >= 400:
            raise rebuild_error(status, payload)
        return payload

    # ---------------------------------------------------------------- identity & status
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/v1/health", timeout=min(self.timeout, 10.0))

    def id(self) -> dict[str, Any]:
        return self.request("GET", "/v1/id")

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def peers(self) -> dict[str, Any]:
        return self.request("GET", "/v1/peers")

    def openapi(self) -> dict[str, Any]:
        return self.request("GET", "/openapi.json")

    # ---------------------------------------------------------------- storage
    def add(self, path: str, cid_version: int = 0, pin: bool = True,
            recursive: bool = True) -> dict[str, Any]:
        return self.request("POST", "/v1/add", {"path": str(path), "cid_version": cid_version,
                                                "pin": pin, "recursive": recursive})

    def add_stream(self, stream: IO[bytes], length: int, cid_version: int = 0,
                   pin: bool = True, name: str = "",
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload ``length`` bytes from ``stream`` as one file; ``progress(n)`` per chunk."""
        query = urlencode({"cid_version": cid_version, "pin": str(pin).lower(), "name": name})
        conn = self._conn(timeout=max(self.timeout, 300.0))
        try:
            try:
                conn.putrequest("POST", f"/v1/files?{query}")
                for k, v in self._headers({"Content-Type": "application/octet-stream",
                                           "Content-Length": str(length)}).items():
                    conn.putheader(k, v)
                conn.endheaders()
                remaining = length
                while remaining > 0:
                    chunk = stream.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise errors.PathNotFoundError(
                            f"the input ended after {length - remaining} of {length} bytes "
                            "(file changed while reading?)")
                    conn.send(chunk)
                    remaining -= len(chunk)
                    if progress:
                        progress(len(chunk))
                resp = conn.getresponse()
                raw = resp.read()
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                    http.client.RemoteDisconnected) as exc:
                raise errors.DaemonNotRunningError(
                    f"the daemon at {self.url} went away during the upload ({exc})") from None
        finally:
            conn.close()
        return self._decode(resp.status, raw)

    def stat(self, cid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/stat/{quote(cid, safe='')}")

    @contextlib.contextmanager
    def open_file(self, cid: str) -> Iterator[tuple[int | None, IO[bytes]]]:
        """``with client.open_file(cid) as (size, stream):`` streams a file's bytes."""
        conn = self._conn(timeout=max(self.timeout, 300.0))
        try:
            try:
                conn.request("GET", f"/v1/files/{quote(cid, safe='')}", headers=self._headers())
                resp = conn.getresponse()
            except (ConnectionRefusedError, ConnectionResetError) as exc:
                raise errors.DaemonNotRunningError(
                    f"the daemon at {self.url} does not answer ({exc})") from None
            if resp.status >= 400:
                raise rebuild_error(resp.status, self._decode_error(resp.read()))
            size = resp.getheader("Content-Length")
            yield (int(size) if size is not None else None), resp
        finally:
            conn.close()

    @staticmethod
    def _decode_error(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw[:200].decode("utf-8", "replace")

    def get(self, cid: str, dest: str) -> dict[str, Any]:
        return self.request("POST", "/v1/get", {"cid": cid, "dest": str(dest)},
                            timeout=max(self.timeout, 3600.0))

    def ls(self, cid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/ls/{quote(cid, safe='')}")

    def pin_add(self, cid: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/pins/{quote(cid, safe='')}", {})

    def pin_rm(self, cid: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/pins/{quote(cid, safe='')}", {})

    def pin_ls(self) -> dict[str, Any]:
        return self.request("GET", "/v1/pins")

    # ---------------------------------------------------------------- tasks
    def submit(self, task_id: str, task_type: str, data: Any = None, priority: int = 5,
               tags: list[str] | None = None, requires: list[str] | None = None,
               max_attempts: int = 3, lease_seconds: float = 60) -> dict[str, Any]:
        return self.request("POST", "/v1/tasks", {
            "task_id": task_id, "task_type": task_type, "data": data, "priority": priority,
            "tags": tags, "requires": requires, "max_attempts": max_attempts,
            "lease_seconds": lease_seconds})

    def submit_batch(self, tasks: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("POST", "/v1/tasks/batch", {"tasks": list(tasks)})

    def tasks(self, state: str | None = None, limit: int = 100) -> dict[str, Any]:
        return self.request("GET", "/v1/tasks", query={"state": state, "limit": limit})

    def task(self, task_id: str, owner: str | None = None) -> dict[str, Any]:
        return self.request("GET", f"/v1/tasks/{quote(task_id, safe='')}",
                            query={"owner": owner})

    def cancel(self, task_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/tasks/{quote(task_id, safe='')}/cancel", {})

    def claim(self, worker_id: str, capabilities: list[str] | None = None,
              wait: float = 0.0) -> dict[str, Any] | None:
        body = {"worker_id": worker_id, "capabilities": list(capabilities or []), "wait": wait}
        return self.request("POST", "/v1/claim", body, timeout=self.timeout + wait)["task"]

    def heartbeat(self, task_id: str, lease_id: str,
                  worker_id: str | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/tasks/{quote(task_id, safe='')}/heartbeat",
                            {"lease_id": lease_id, "worker_id": worker_id})

    def complete(self, task_id: str, lease_id: str, result: Any = None,
                 result_cid: str | None = None, worker_id: str | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/tasks/{quote(task_id, safe='')}/complete",
                            {"lease_id": lease_id, "result": result, "result_cid": result_cid,
                             "worker_id": worker_id})

    def fail(self, task_id: str, lease_id: str, error: str, retryable: bool = True,
             worker_id: str | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/tasks/{quote(task_id, safe='')}/fail",
                            {"lease_id": lease_id, "error": error, "retryable": retryable,
                             "worker_id": worker_id})

    # ---------------------------------------------------------------- provenance
    def append(self, record_type: str, fields: dict[str, Any] | None = None,
               input_cid: str | None = None, output_cid: str | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/provenance", {
            "record_type": record_type, "fields": fields or {}, "input_cid": input_cid,
            "output_cid": output_cid})

    def logs(self, filters: dict[str, Any] | None = None, limit: int = 100,
             since: float | None = None, until: float | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/provenance/query", {
            "filters": filters or {}, "limit": limit, "since": since, "until": until})

    def record(self, cid: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/provenance/{quote(cid, safe='')}")

    def verify(self, cid: str | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/provenance/verify", {"cid": cid})


def path_arg(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())
