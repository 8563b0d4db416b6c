"""The local control API: HTTP/1.1 + JSON on 127.0.0.1, bearer-token protected.

Why the stdlib ``ThreadingHTTPServer`` in its own thread rather than a trio server: every
operation behind the API is a synchronous, thread-safe service call (SQLite, file I/O) or a
call into the P2P handle, which already owns its trio loop in another thread. A thread per
request calls them directly; a trio server would only bounce each call to a worker thread.
It also keeps the control plane independent of the P2P loop, so ``status`` still answers if
the P2P host is busy or wedged, and it adds no dependency.

Security: the socket is bound to loopback only (settings refuse anything else); every route
except ``/openapi.json`` needs ``Authorization: Bearer <token>`` with the token from
``<cache_dir>/control.token`` (mode 0600); the Host header must name a loopback host, which
defeats DNS-rebinding pages in a browser. No CORS headers are ever sent.
"""

from __future__ import annotations

import functools
import hmac
import http.server
import inspect
import json
import logging
import re
import select
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from node import errors
from node.daemon._idle import IdleConnections
from node.daemon.api import NodeAPI

log = logging.getLogger("dsi.control")

MAX_JSON_BODY = 16 << 20
# How long a thread waits for a keep-alive connection's next request before parking it.
_LINGER_MS = 20
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}

# HTTP status of each error class; the most specific class in the MRO wins.
_STATUS: dict[type[BaseException], int] = {
    errors.ConfigError: 400,
    errors.InvalidArgumentError: 400,
    errors.UnsafePathError: 400,
    errors.NotFoundError: 404,
    errors.PathNotFoundError: 404,
    errors.ConflictError: 409,
    errors.TaskStateError: 409,
    errors.LeaseError: 409,
    errors.IncapableError: 422,
    errors.CorruptBlockError: 500,
    errors.ProvenanceError: 422,
    errors.EncodingError: 400,
    errors.PeerDeniedError: 403,
    errors.PeerError: 502,
    errors.KuboUnavailableError: 503,
    errors.StorageError: 500,
    errors.DatasetsError: 400,
}


def error_status(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    body: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    cid = getattr(exc, "cid", None)
    if isinstance(cid, str):
        body["cid"] = cid
    detail = getattr(exc, "detail", None)
    if isinstance(detail, str):
        body["detail"] = detail
    return {"error": body}


def load_openapi() -> dict[str, Any]:
    text = resources.files("node.daemon").joinpath("openapi.json").read_text("utf-8")
    return json.loads(text)


# -- routes -------------------------------------------------------------------------------
# Each handler gets (api, path params, query dict, JSON body dict) and returns a JSON value.
Handler = Callable[[NodeAPI, dict[str, str], dict[str, str], dict[str, Any]], Any]


def _kw(fn: Callable[..., Any], *sources: dict[str, Any]) -> dict[str, Any]:
    """Merge request values into keyword arguments, refusing names ``fn`` does not take."""
    params = _parameters(getattr(fn, "__func__", fn))
    merged: dict[str, Any] = {}
    for src in sources:
        merged.update(src)
    unknown = sorted(set(merged) - set(params))
    if unknown:
        raise errors.InvalidArgumentError(
            f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(params)}"
        )
    return merged


@functools.cache
def _parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Keyword names of an API method (``self`` left out), read once per method."""
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")


def _call(name: str) -> Handler:
    def handler(api: NodeAPI, path: dict[str, str], query: dict[str, str],
                body: dict[str, Any]) -> Any:
        fn = getattr(api, name)
        return fn(**_kw(fn, path, body))

    handler.__name__ = name
    return handler


def _tasks_list(api: NodeAPI, path: dict[str, str], query: dict[str, str],
                body: dict[str, Any]) -> Any:
    return api.tasks(state=query.get("state") or None, limit=_int(query.get("limit", "100")))


def _task(api: NodeAPI, path: dict[str, str], query: dict[str, str],
          body: dict[str, Any]) -> Any:
    return api.task(path["task_id"], owner=query.get("owner") or None)


def _claim(api: NodeAPI, path: dict[str, str], query: dict[str, str],
           body: dict[str, Any]) -> Any:
    return {"task": api.claim(**_kw(api.claim, body))}


def _int(value: str, name: str = "limit") -> int:
    try:
        return int(value)
    except ValueError:
        raise errors.InvalidArgumentError(f"{name} must be an integer, got {value!r}") from None


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", r"/v1/health", _call("health")),
    ("GET", r"/v1/id", _call("id")),
    ("GET", r"/v1/status", _call("status")),
    ("GET", r"/v1/peers", _call("peers")),
    ("POST", r"/v1/add", _call("add")),
    ("GET", r"/v1/stat/(?P<cid>[^/]+)", _call("stat")),
    ("POST", r"/v1/get", _call("get")),
    ("GET", r"/v1/ls/(?P<cid>[^/]+)", _call("ls")),
    ("GET", r"/v1/pins", _call("pin_ls")),
    ("POST", r"/v1/pins/(?P<cid>[^/]+)", _call("pin_add")),
    ("DELETE", r"/v1/pins/(?P<cid>[^/]+)", _call("pin_rm")),
    ("POST", r"/v1/tasks", _call("submit")),
    ("POST", r"/v1/tasks/batch", _call("submit_batch")),
    ("GET", r"/v1/tasks", _tasks_list),
    ("GET", r"/v1/tasks/(?P<task_id>[^/]+)", _task),
    ("POST", r"/v1/tasks/(?P<task_id>[^/]+)/cancel", _call("cancel")),
    ("POST", r"/v1/tasks/(?P<task_id>[^/]+)/heartbeat", _call("heartbeat")),
    ("POST", r"/v1/tasks/(?P<task_id>[^/]+)/complete", _call("complete")),
    ("POST", r"/v1/tasks/(?P<task_id>[^/]+)/fail", _call("fail")),
    ("POST", r"/v1/claim", _claim),
    ("POST", r"/v1/provenance", _call("append")),
    ("POST", r"/v1/provenance/query", _call("logs")),
    ("POST", r"/v1/provenance/verify", _call("verify")),
    ("GET", r"/v1/provenance/(?P<cid>[^/]+)", _call("record")),
]
# Streaming routes are handled by the request handler itself (raw bytes, not JSON).
STREAM_ROUTES = [("POST", "/v1/files"), ("GET", r"/v1/files/(?P<cid>[^/]+)")]
_COMPILED = [(m, re.compile(p + r"\Z"), h) for m, p, h in ROUTES]
_FILE_GET = re.compile(r"/v1/files/(?P<cid>[^/]+)\Z")


class ControlServer(http.server.HTTPServer):
    """``HTTPServer`` whose requests are handled by a bounded thread pool.

    A pool rather than ``ThreadingHTTPServer``'s thread per connection: the services keep
    per-thread SQLite connections, so long-lived threads reuse them instead of opening one
    per request, and a flood of connections cannot create unbounded threads. A thread serves
    one request, not a connection: between requests a keep-alive connection is parked with the
    idle watcher (``_idle``), so idle clients hold no thread and cannot starve the pool; it is
    closed after ``idle_timeout`` seconds without a request.
    """

    allow_reuse_address = True

    def __init__(self, host: str, port: int, api: NodeAPI, token: str,
                 max_threads: int = 64, max_parked: int = 256,
                 idle_timeout: float = 15.0) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.api = api
        self.token = token
        self.openapi = load_openapi()
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="dsi-control")
        self._idle = IdleConnections(self._resume, self.shutdown_request,
                                     timeout=idle_timeout, max_parked=max_parked)
        self._closing = False
        super().__init__((host, port), _RequestHandler)  # on failure it calls server_close

    def process_request(self, request: Any, client_address: Any) -> None:
        self._pool.submit(self._process, request, client_address)

    def _resume(self, request: Any, client_address: Any) -> None:
        try:
            self._pool.submit(self._process, request, client_address)
        except RuntimeError:  # the pool is shut down: the server is closing
            self.shutdown_request(request)

    def _process(self, request: Any, client_address: Any) -> None:
        try:
            waiting = select.poll()
            waiting.register(request, select.POLLIN)
            while True:
                handler = self.RequestHandlerClass(request, client_address, self)
                if handler.close_connection or self._closing:
                    break
                # A client that sends its next request at once (a worker's claim after a
                # complete) is served by this thread; a quiet one is parked.
                if not waiting.poll(_LINGER_MS):
                    self._idle.park(request, client_address)
                    return
        except Exception:
            self.handle_error(request, client_address)
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("control API connection from %s failed", client_address, exc_info=True)

    def server_close(self) -> None:
        self._closing = True
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._idle.close()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> threading.Thread:
        threading.Thread(target=self._idle.run, name="dsi-control-idle", daemon=True).start()
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="dsi-control-api", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    server: ControlServer
    protocol_version = "HTTP/1.1"
    server_version = "dsi-node"
    # Socket timeout while a request is being read or answered: a client that stalls mid-request
    # gives its pool thread back after this many seconds. (Between requests a connection holds
    # no thread: see ControlServer's idle_timeout.)
    timeout = 15
    # Headers and body leave in two writes; with Nagle on, the second waits for the client's
    # delayed ACK, and a keep-alive client (Go's http.Client, requests.Session) got 23 requests
    # per second instead of ~2,000.
    disable_nagle_algorithm = True

    def handle(self) -> None:
        """One request, then back to the server, which parks a keep-alive connection idle.

        A client that pipelines (sends the next request before reading this answer) may have
        it buffered in ``rfile`` already; that one is served here, since a buffer is invisible
        to the idle watcher's selector.
        """
        self.handle_one_request()
        while not self.close_connection and self._pipelined():
            self.handle_one_request()

    def _pipelined(self) -> bool:
        sock = self.connection
        sock.setblocking(False)
        try:
            return bool(self.rfile.peek(1))  # type: ignore[attr-defined]
        except (BlockingIOError, OSError):
            return False
        finally:
            sock.settimeout(self.timeout)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ---------------------------------------------------------------- helpers
    def _send_json(self, status: int, value: Any) -> None:
        data = json.dumps(value, separators=(",", ":"), default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: BaseException) -> None:
        status = error_status(exc)
        if status >= 500 and not isinstance(exc, errors.DatasetsError):
            log.exception("control API: unexpected error on %s %s", self.command, self.path)
        self._drain_body()
        self._send_json(status, error_body(exc))

    def _content_length(self) -> int | None:
        """The request's Content-Length (None when absent). A value that is not a plain
        decimal number is a 400, and the connection closes: where its body ends is unknown."""
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        text = text.strip()
        if not (text.isascii() and text.isdigit()):
            self.close_connection = True
            raise errors.InvalidArgumentError(
                f"Content-Length must be a non-negative decimal number, got {text[:40]!r}")
        return int(text)

    def _drain_body(self) -> None:
        """Read an unread request body so the keep-alive connection stays in sync."""
        if getattr(self, "_body_read", False):
            return
        self._body_read = True
        try:
            length = self._content_length() or 0
        except errors.InvalidArgumentError:
            return  # the connection closes after the error response
        if 0 < length <= MAX_JSON_BODY:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _json_body(self) -> dict[str, Any]:
        self._body_read = True
        length = self._content_length() or 0
        if length > MAX_JSON_BODY:
            self.close_connection = True
            raise errors.InvalidArgumentError(
                f"request body of {length} bytes is over the {MAX_JSON_BODY}-byte limit; "
                "send large content with POST /v1/files")
        if not length:
            return {}
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise errors.InvalidArgumentError(f"request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise errors.InvalidArgumentError("request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise errors.InvalidArgumentError("request body must be a JSON object")
        return body

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.server.token.encode())

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in _LOOPBACK_NAMES

    # ---------------------------------------------------------------- dispatch
    def _dispatch(self, method: str) -> None:
        self._body_read = False
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if not self._host_ok():
                self._drain_body()
                self._send_json(403, {"error": {"type": "Forbidden", "message":
                                "the control API answers only to a loopback Host header"}})
                return
            if method == "GET" and path == "/openapi.json":
                self._send_json(200, self.server.openapi)
                return
            if not self._authorised():
                self._drain_body()
                self._send_json(401, {"error": {"type": "Unauthorized", "message":
                                "missing or wrong bearer token: send 'Authorization: Bearer "
                                "<token>' with the token from <cache_dir>/control.token"}})
                return
            if method == "POST" and path == "/v1/files":
                self._upload(query)
                return
            match = _FILE_GET.match(path)
            if method == "GET" and match:
                self._download(unquote(match["cid"]))
                return
            allowed = []
            for m, pattern, handler in _COMPILED:
                found = pattern.match(path)
                if not found:
                    continue
                if m != method:
                    allowed.append(m)
                    continue
                params = {k: unquote(v) for k, v in found.groupdict().items()}
                body = self._json_body() if method in ("POST", "DELETE") else {}
                result = handler(self.server.api, params, query, body)
                self._send_json(200, result)
                return
            self._drain_body()
            if allowed:
                self._send_json(405, {"error": {"type": "MethodNotAllowed", "message":
                                f"{method} {path}: use {', '.join(sorted(set(allowed)))}"}})
            else:
                self._send_json(404, {"error": {"type": "NoSuchRoute", "message":
                                f"no route {method} {path}; see GET /openapi.json"}})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except TypeError as exc:  # a JSON value of the wrong shape reached a service call
            self._send_error(errors.InvalidArgumentError(f"bad request: {exc}"))
        except Exception as exc:
            self._send_error(exc)

    def _upload(self, query: dict[str, str]) -> None:
        self._body_read = True
        length = self._content_length()
        if length is None:
            self.close_connection = True
            self._send_json(411, {"error": {"type": "LengthRequired", "message":
                            "POST /v1/files needs a Content-Length header"}})
            return
        cid_version = _int(query.get("cid_version", "0"), "cid_version")
        pin = query.get("pin", "true").lower() not in ("0", "false", "no", "off")
        result = self.server.api.add_stream(self.rfile, length,
                                            cid_version=cid_version, pin=pin,
                                            name=query.get("name", ""))
        self._send_json(200, result)

    def _download(self, cid: str) -> None:
        size, chunks = self.server.api.open_file(cid)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if size is not None:
            self.send_header("Content-Length", str(size))
            self.send_header("X-Dsi-Size", str(size))
        else:
            self.close_connection = True  # length unknown: the end of the body is EOF
        self.end_headers()
        sent = 0
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                sent += len(chunk)
        except errors.DatasetsError:
            # Headers are out: the client sees a short body (Content-Length mismatch).
            log.exception("control API: streaming %s failed after %d bytes", cid, sent)
            self.close_connection = True
