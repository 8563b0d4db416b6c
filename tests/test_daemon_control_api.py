"""The control API in-process: token, JSON in/out, errors, the OpenAPI file, streaming."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node import errors
from node.config import build_config
from node.daemon.api import NodeAPI
from node.daemon.client import ControlClient
from node.daemon.runner import ensure_token
from node.daemon.server import ROUTES, STREAM_ROUTES, ControlServer, load_openapi
from node.daemon.testing import free_port
from node.services import acquire_services, release_services
from protocols.codec import MAX_JSON_DEPTH

HELLO_V0 = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
HELLO_V1 = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


class Served:
    def __init__(self, tmp: Path) -> None:
        # A closed port as the Kubo API: every Kubo probe fails fast and deterministically.
        self.cfg = build_config(cache_dir=tmp / "node",
                                ipfs_api=f"/ip4/127.0.0.1/tcp/{free_port()}")
        self.services = acquire_services(self.cfg)
        self.api = NodeAPI(self.services)
        self.token = ensure_token(self.cfg.control_token_path)
        self.server = ControlServer("127.0.0.1", 0, self.api, self.token)
        self.server.start()
        self.client = ControlClient(self.cfg, self.server.url, self.token)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, json.loads(data) if data else None

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def close(self) -> None:
        self.server.stop()
        release_services(self.services)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_token_is_required(served: Served) -> None:
    status, body = served.raw("GET", "/v1/status")
    assert status == 401
    assert body["error"]["type"] == "Unauthorized"
    assert "control.token" in body["error"]["message"]
    status, _ = served.raw("GET", "/v1/status", headers={"Authorization": "Bearer nope"})
    assert status == 401
    status, body = served.raw("GET", "/v1/status", headers=served.auth())
    assert status == 200
    assert body["peer_id"] == served.services.peer_id
    # A wrong token through the client is a clear error, not a crash.
    bad = ControlClient(served.cfg, served.server.url, "wrong")
    with pytest.raises(errors.DatasetsError, match="refused the token"):
        bad.status()


def test_token_file_is_private_and_stable(served: Served) -> None:
    path = served.cfg.control_token_path
    assert path.stat().st_mode & 0o777 == 0o600
    os.chmod(path, 0o644)
    assert ensure_token(path) == served.token  # reused, and the mode is tightened
    assert path.stat().st_mode & 0o777 == 0o600


def test_only_loopback_host_headers(served: Served) -> None:
    status, body = served.raw("GET", "/v1/status",
                              headers={**served.auth(), "Host": "attacker.example:5080"})
    assert status == 403
    assert "loopback" in body["error"]["message"]
    assert served.server.server_address[0] == "127.0.0.1"


def test_openapi_is_public_and_matches_routes(served: Served) -> None:
    status, spec = served.raw("GET", "/openapi.json")
    assert status == 200
    assert spec == load_openapi()
    assert spec["openapi"].startswith("3.")
    served_routes = {(m, re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", p))
                     for m, p, _ in ROUTES}
    served_routes |= {(m, re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", p))
                      for m, p in STREAM_ROUTES}
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops
                  if p != "/openapi.json"}
    assert served_routes == documented
    # Every $ref resolves.
    refs = set(re.findall(r'"\$ref": "#/components/(\w+)/(\w+)"', json.dumps(spec)))
    for section, name in refs:
        assert name in spec["components"][section], name
    # The request bodies name exactly the keyword arguments the API methods take.
    schemas = spec["components"]["schemas"]
    assert set(schemas["SubmitRequest"]["properties"]) == {
        "task_id", "task_type", "data", "priority", "tags", "requires", "max_attempts",
        "lease_seconds"}
    assert set(schemas["ClaimRequest"]["properties"]) == {"worker_id", "capabilities", "wait"}
    assert set(schemas["SubmitBatchRequest"]["properties"]) == {"tasks"}


def test_json_errors_keep_their_class(served: Served) -> None:
    c = served.client
    with pytest.raises(errors.NotFoundError, match="no task with id 'missing'"):
        c.task("missing")
    status, body = served.raw("GET", "/v1/tasks/missing", headers=served.auth())
    assert status == 404 and body["error"]["type"] == "NotFoundError"
    status, body = served.raw("POST", "/v1/tasks", body=b"{not json",
                              headers={**served.auth(), "Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = served.raw("POST", "/v1/tasks", body=json.dumps(
        {"task_id": "a", "task_type": "t", "colour": "red"}).encode(), headers=served.auth())
    assert status == 400 and "unknown field(s) colour" in body["error"]["message"]
    status, body = served.raw("DELETE", "/v1/status", headers=served.auth())
    assert status == 405
    status, body = served.raw("GET", "/v1/nothing", headers=served.auth())
    assert status == 404 and body["error"]["type"] == "NoSuchRoute"
    with pytest.raises(errors.InvalidArgumentError, match="priority"):
        c.submit("bad", "echo", {}, priority=42)
    with pytest.raises(errors.InvalidCIDError):
        c.ls("not-a-cid")
    with pytest.raises(errors.DatasetsError, match="P2P is off"):
        c.peers()


def test_batch_submit_is_all_or_nothing(served: Served) -> None:
    c = served.client
    batch = [{"task_id": f"b-{n}", "task_type": "echo", "data": {"n": n}} for n in (2, 0, 1)]
    statuses = c.submit_batch(batch)["tasks"]
    assert [t["task_id"] for t in statuses] == ["b-2", "b-0", "b-1"]
    assert {t["owner"] for t in statuses} == {served.services.peer_id}
    with pytest.raises(errors.ConflictError):  # 409, and b-3 is not kept either
        c.submit_batch([{"task_id": "b-3", "task_type": "echo", "data": {}},
                        {"task_id": "b-0", "task_type": "echo", "data": {"n": "other"}}])
    with pytest.raises(errors.NotFoundError):
        c.task("b-3")
    with pytest.raises(errors.InvalidArgumentError):
        c.submit_batch([{"task_id": "b-4", "task_type": "echo", "data": {}, "colour": 1}])
    status, body = served.raw("POST", "/v1/tasks/batch", body=json.dumps(
        {"tasks": "not a list"}).encode(), headers=served.auth())
    assert status == 400 and body["error"]["type"] == "InvalidArgumentError"
    order = [c.claim("w", [])["task_id"] for _ in range(3)]
    assert order == ["b-2", "b-0", "b-1"]


def test_task_round_trip_with_fencing(served: Served) -> None:
    c = served.client
    st = c.submit("t-1", "echo", {"x": 1}, priority=7, tags=["GPU_PREFERRED"],
                  requires=["cuda"], lease_seconds=30)
    assert st["status"] == "pending" and st["owner"] == served.services.peer_id
    # Same id, same body: idempotent. Different body: conflict, same class as in-process.
    assert c.submit("t-1", "echo", {"x": 1}, priority=7, tags=["GPU_PREFERRED"],
                    requires=["cuda"], lease_seconds=30)["status"] == "pending"
    with pytest.raises(errors.ConflictError):
        c.submit("t-1", "echo", {"x": 2})
    assert c.claim("cpu-worker", ["CPU"]) is None  # requires CUDA: never handed out
    grant = c.claim("gpu-worker", ["GPU", "CUDA"])
    assert grant is not None and grant["task_id"] == "t-1" and grant["data"] == {"x": 1}
    assert served.api.held_leases()[0]["task_id"] == "t-1"
    hb = c.heartbeat("t-1", grant["lease_id"], worker_id="gpu-worker")
    assert hb["lease_expires_at"] >= grant["lease_expires_at"]
    with pytest.raises(errors.LeaseError):
        c.complete("t-1", "not-the-lease", {"ok": True})
    done = c.complete("t-1", grant["lease_id"], {"ok": True}, worker_id="gpu-worker")
    assert done["status"] == "completed"
    assert served.api.held_leases() == []
    listed = c.tasks(state="completed")["tasks"]
    assert [t["task_id"] for t in listed] == ["t-1"]
    assert c.task("t-1")["result"] == {"ok": True}
    c.submit("t-2", "echo", {})
    assert c.cancel("t-2")["status"] == "cancelled"


def test_claim_long_poll_wakes_on_submit(served: Served) -> None:
    import threading

    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(served.client.claim("w", [], wait=20)))
    t.start()
    served.client.submit("late", "echo", {})
    t.join(30)
    assert not t.is_alive()
    assert got and got[0] is not None and got[0]["task_id"] == "late"


def test_files_stream_up_and_down(served: Served, tmp_path: Path) -> None:
    c = served.client
    info = c.add_stream(io.BytesIO(b"hello world\n"), 12, name="h.txt")
    assert info["cid"] == HELLO_V0 and info["kubo"] is False and info["size"] == 12
    assert c.add_stream(io.BytesIO(b"hello world\n"), 12, cid_version=1)["cid"] == HELLO_V1
    payload = os.urandom(3 * 262144 + 5)
    seen: list[int] = []
    big = c.add_stream(io.BytesIO(payload), len(payload), progress=seen.append)
    assert sum(seen) == len(payload)
    # The same bytes added in-process get the same CID.
    f = tmp_path / "big.bin"
    f.write_bytes(payload)
    assert served.api.add_local(f)["cid"] == big["cid"]
    with c.open_file(big["cid"]) as (size, stream):
        assert size == len(payload)
        assert stream.read() == payload
    assert c.stat(big["cid"]) == {"cid": big["cid"], "type": "file", "size": len(payload)}
    pins = {p["cid"] for p in c.pin_ls()["pins"]}
    assert big["cid"] in pins
    assert c.pin_rm(big["cid"])["pinned"] is False
    assert big["cid"] not in {p["cid"] for p in c.pin_ls()["pins"]}
    assert c.pin_add(big["cid"])["pinned"] is True
    # An upload that ends early is refused and adds nothing.
    import socket

    with socket.create_connection(("127.0.0.1", served.server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + served.token.encode() +
                     b"\r\nContent-Length: 10\r\n\r\nabc")
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400")
    assert b"upload ended after 3 of 10 bytes" in reply
    with pytest.raises(errors.BlockNotFoundError):
        c.stat("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")


def test_add_and_get_paths(served: Served, tmp_path: Path) -> None:
    c = served.client
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a\n")
    (src / "sub" / "b.txt").write_text("b\n")
    info = c.add(str(src))
    assert info["type"] == "directory"
    names = [e["name"] for e in c.ls(info["cid"])["entries"]]
    assert names == ["a.txt", "sub"]
    out = tmp_path / "out"
    assert c.get(info["cid"], str(out))["dest"] == str(out)
    assert (out / "sub" / "b.txt").read_text() == "b\n"
    with pytest.raises(errors.InvalidArgumentError, match="absolute"):
        c.add("relative/path")
    with pytest.raises(errors.PathNotFoundError):
        c.add(str(tmp_path / "missing"))


def test_provenance_over_the_api(served: Served) -> None:
    c = served.client
    rec = c.append("inference", {"model": "bert-base", "data": {"duration_ms": 5}},
                   output_cid=HELLO_V0)
    assert rec["ipfs"] is False
    got = c.record(rec["cid"])
    assert got["cid"] == rec["cid"] and got["model"] == "bert-base"
    assert got["node"] == served.services.peer_id
    found = c.logs({"type": "inference", "model": "bert-base"})["records"]
    assert [r["cid"] for r in found] == [rec["cid"]]
    assert c.logs({"type": "inference", "model": "gpt"})["records"] == []
    assert c.verify()["records"] == 1
    assert c.verify(rec["cid"])["ok"] is True
    json.dumps(found)  # plain JSON all the way through


@pytest.mark.parametrize("length", ["abc", "-5", "1e3", "١٢"])
@pytest.mark.parametrize("path", ["/v1/tasks", "/v1/files"])
def test_malformed_content_length_is_a_400(served: Served, path: str, length: str) -> None:
    """Not a 500 from deep inside: a clear error, nothing stored, the connection closed."""
    import socket

    with socket.create_connection(("127.0.0.1", served.server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                     f"{served.token}\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
        reply = b""
        while chunk := sock.recv(65536):  # the server closes: it cannot know where a body ends
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    error = json.loads(body)["error"]
    assert error["type"] == "InvalidArgumentError" and "Content-Length" in error["message"]
    assert served.client.tasks()["tasks"] == []
    assert served.client.pin_ls()["pins"] == []


def test_keep_alive_clients_get_answers_without_a_delayed_ack_stall(served: Served) -> None:
    """A persistent connection (Go's http.Client, requests.Session, curl) serves request after
    request. With Nagle's algorithm on the server socket each answer waited for the client's
    delayed ACK (~40 ms): 50 requests took >= 2 s. The bound here is far above a working
    server's time (~50 ms) and below the stall's floor."""

    conn = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=30)
    try:
        started = time.monotonic()
        for _ in range(50):
            conn.request("GET", "/v1/health", headers=served.auth())
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["ok"] is True
            assert resp.getheader("Connection") != "close"
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    assert elapsed < 1.5, f"50 keep-alive requests took {elapsed:.2f} s"


def test_idle_keep_alive_connections_hold_no_thread(tmp_path: Path) -> None:
    """More idle keep-alive clients than the pool has threads: a new client is still served
    at once, each parked client can send again, and an idle one is closed after the timeout."""

    served = Served(tmp_path)
    served.server.stop()  # a server with a 4-thread pool and a 1 s idle timeout instead
    small = ControlServer("127.0.0.1", 0, served.api, served.token, max_threads=4,
                          idle_timeout=1)
    small.start()
    clients = [http.client.HTTPConnection("127.0.0.1", small.port, timeout=10)
               for _ in range(12)]
    try:
        for conn in clients:  # each keeps its connection open, idle, after one answer
            conn.request("GET", "/v1/health", headers=served.auth())
            assert conn.getresponse().read()
        other = http.client.HTTPConnection("127.0.0.1", small.port, timeout=5)
        other.request("GET", "/v1/health", headers=served.auth())
        assert json.loads(other.getresponse().read())["ok"] is True
        other.close()
        for conn in clients[:6]:  # parked connections serve their next request
            conn.request("GET", "/v1/health", headers=served.auth())
            assert json.loads(conn.getresponse().read())["ok"] is True
        quiet = http.client.HTTPConnection("127.0.0.1", small.port, timeout=10)
        quiet.request("GET", "/v1/health", headers=served.auth())
        assert quiet.getresponse().read()
        assert quiet.sock is not None
        time.sleep(3.5)  # > the idle timeout plus the watcher's 1 s tick
        assert quiet.sock.recv(1) == b""  # closed by the server
        quiet.close()
    finally:
        for conn in clients:
            conn.close()
        small.stop()
        release_services(served.services)


def test_servers_release_their_sockets_started_or_not(served: Served) -> None:
    """A server that fails to bind, or is closed without having run, leaks no descriptor."""
    import socket

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(20):
        ControlServer("127.0.0.1", 0, served.api, served.token).server_close()
        with pytest.raises(OSError):
            ControlServer("127.0.0.1", served.server.port, served.api, served.token)
        started = ControlServer("127.0.0.1", 0, served.api, served.token)
        started.start()
        with socket.create_connection(("127.0.0.1", started.port), timeout=10):
            pass
        started.stop()
    deadline = time.monotonic() + 10  # the idle watchers exit within their 1 s tick
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds() <= before


def test_pipelined_requests_are_all_answered(served: Served) -> None:
    """Two requests in one write: the second sits in the reader's buffer, not in the socket."""
    import socket

    request = (b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
               + served.token.encode() + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", served.server.port), timeout=10) as sock:
        sock.sendall(request * 2)
        reply = b""
        while reply.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk


def test_hostile_json_bodies_are_400s(served: Served) -> None:
    auth = {**served.auth(), "Content-Type": "application/json"}
    deep = b'{"task_id": "t", "task_type": "x", "data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    status, body = served.raw("POST", "/v1/tasks", deep, auth)
    assert status == 400 and "nested too deeply" in body["error"]["message"]
    served.client.submit("c1", "x", {})
    for bad in ({"worker_id": "w", "capabilities": "GPU"}, {"worker_id": "w", "wait": "soon"}):
        status, body = served.raw("POST", "/v1/claim", json.dumps(bad).encode(), auth)
        assert status == 400 and body["error"]["type"] == "InvalidArgumentError", body
    assert served.client.task("c1")["status"] == "pending"  # nothing was claimed
    assert [t["task_id"] for t in served.client.tasks()["tasks"]] == ["c1"]


def test_data_at_the_nesting_limit_round_trips(served: Served) -> None:
    """Stored data re-encodes in the server's deeper stack; one level more is a 400."""
    auth = {**served.auth(), "Content-Type": "application/json"}

    def nested(depth: int) -> bytes:
        return b"[" * depth + b"]" * depth

    body = b'{"task_id": "d", "task_type": "x", "data": ' + nested(MAX_JSON_DEPTH) + b"}"
    status, reply = served.raw("POST", "/v1/tasks", body, auth)
    assert status == 200, reply
    assert served.client.task("d")["data"] == json.loads(nested(MAX_JSON_DEPTH))
    assert served.client.tasks()["tasks"][0]["data"] == json.loads(nested(MAX_JSON_DEPTH))
    body = b'{"task_id": "e", "task_type": "x", "data": ' + nested(MAX_JSON_DEPTH + 1) + b"}"
    status, reply = served.raw("POST", "/v1/tasks", body, auth)
    assert status == 400 and f"more than {MAX_JSON_DEPTH} levels" in reply["error"]["message"]
