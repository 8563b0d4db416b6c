"""A small client for the Kubo RPC API (``/api/v0``) on httpx, with a timeout on every call.

Works against Kubo and against the js-ipfs 0.66 daemon the tests use. Their differences that
matter here: CIDv1 comes back in base58 unless ``cid-base=base32`` is sent (we always send it
and parse whatever comes back); js-ipfs ignores ``cid-codec`` on ``block/put`` and needs the
legacy ``format=`` (chosen from the ``id`` AgentVersion); a block nobody has makes js-ipfs wait
forever even offline, so ``block/get`` and ``pin/add`` carry the RPC-level ``timeout=``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import threading
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from node.errors import (
    BlockNotFoundError,
    ConfigError,
    KuboUnavailableError,
    PathNotFoundError,
    StorageError,
)

from ._cid import CID, parse_cid

_NOT_FOUND_HINTS = ("not found", "timed out", "timeout", "no link named", "deadline exceeded")


def api_url(ipfs_api: str) -> str:
    """``/ip4/127.0.0.1/tcp/5001`` (or ``/dns4/host/tcp/port[/https]``, or a URL) -> base URL."""
    api = ipfs_api.strip()
    if api.startswith(("http://", "https://")):
        return api.rstrip("/")
    parts = [p for p in api.split("/") if p]
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[2] == "tcp":
        host = f"[{parts[1]}]" if parts[0] == "ip6" else parts[1]
        try:
            port = int(parts[3])
        except ValueError:
            port = -1
        scheme = "https" if "https" in parts[4:] or "tls" in parts[4:] else "http"
        if 0 < port < 65536:
            return f"{scheme}://{host}:{port}"
    raise ConfigError(
        f"ipfs_api {ipfs_api!r} is not a usable address: use a multiaddr like "
        "/ip4/127.0.0.1/tcp/5001 or a URL like http://127.0.0.1:5001"
    )


class KuboClient:
    """Synchronous, thread-safe Kubo RPC client. Every method raises KuboUnavailableError when
    the API does not answer, and BlockNotFoundError when the daemon does not have a block."""

    def __init__(self, ipfs_api: str, timeout: float = 30.0) -> None:
        self.ipfs_api = ipfs_api
        self.base = api_url(ipfs_api) + "/api/v0/"
        self.timeout = timeout
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        self._agent: str | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> KuboClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _params(self, params: dict[str, Any] | None) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for k, v in (params or {}).items():
            if v is None:
                continue
            if isinstance(v, bool):
                v = "true" if v else "false"
            if isinstance(v, (list, tuple)):
                out.extend((k, str(x)) for x in v)
            else:
                out.append((k, str(v)))
        return out

    def _post(
        self,
        cmd: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        t = self.timeout if timeout is None else timeout
        try:
            resp = self._client.post(
                self.base + cmd,
                params=self._params(params),
                timeout=httpx.Timeout(t, connect=min(t, 5.0)),
                **kwargs,
            )
        except (httpx.TransportError, OSError) as exc:
            raise KuboUnavailableError(
                f"Kubo RPC API at {self.ipfs_api} did not answer {cmd} ({type(exc).__name__}: "
                f"{exc}); start the IPFS daemon or check ipfs_api / IPFS_API"
            ) from None
        if resp.status_code >= 400:
            self._raise_for(cmd, params, resp)
        return resp

    def _raise_for(self, cmd: str, params: dict[str, Any] | None, resp: httpx.Response) -> None:
        try:
            msg = str(resp.json().get("Message", resp.text))
        except (ValueError, AttributeError):
            msg = resp.text[:300]
        arg = (params or {}).get("arg")
        if cmd in ("block/get", "cat", "ls", "get", "pin/add", "block/stat") and any(
            h in msg.lower() for h in _NOT_FOUND_HINTS
        ):
            raise BlockNotFoundError(f"Kubo at {self.ipfs_api} does not have {arg}: {msg}")
        if resp.status_code in (404, 405):
            raise KuboUnavailableError(
                f"{self.ipfs_api} does not serve the Kubo RPC command {cmd} (HTTP "
                f"{resp.status_code}); is ipfs_api the RPC port (5001), not the gateway?"
            )
        raise StorageError(f"Kubo {cmd} {arg or ''} failed (HTTP {resp.status_code}): {msg}")

    def _json(self, cmd: str, params: dict[str, Any] | None = None, **kw: Any) -> Any:
        resp = self._post(cmd, params, **kw)
        try:
            return resp.json()
        except ValueError:
            raise StorageError(f"Kubo {cmd} returned non-JSON: {resp.text[:200]!r}") from None

    @staticmethod
    def _ndjson(text: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    @staticmethod
    def _tparam(seconds: float) -> str:
        return f"{max(1, int(seconds * 1000))}ms"

    # -- info ---------------------------------------------------------------------------------
    def version(self, timeout: float | None = None) -> dict[str, Any]:
        return self._json("version", timeout=timeout)

    def id(self, timeout: float | None = None) -> dict[str, Any]:
        info = self._json("id", timeout=timeout)
        self._agent = str(info.get("AgentVersion", ""))
        return info

    def agent_version(self) -> str:
        if self._agent is None:
            self.id()
        return self._agent or ""

    @property
    def is_js_ipfs(self) -> bool:
        return self.agent_version().startswith("js-ipfs")

    # -- blocks -------------------------------------------------------------------------------
    def block_put(self, data: bytes | memoryview, codec: str) -> CID:
        """Store one block; returns the CID the daemon computed (the caller compares it)."""
        params: dict[str, Any] = {"mhtype": "sha2-256", "cid-base": "base32", "pin": "false"}
        if self.is_js_ipfs:
            params["format"] = codec
        else:
            params["cid-codec"] = codec
        files = {"data": ("block", bytes(data), "application/octet-stream")}
        out = self._json("block/put", params, files=files)
        return parse_cid(str(out["Key"]))

    def block_get(self, cid: str | CID, timeout: float | None = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        c = str(cid)
        resp = self._post("block/get", {"arg": c, "timeout": self._tparam(t)}, timeout=t + 2)
        return resp.content

    def block_stat(self, cid: str | CID, timeout: float | None = None) -> dict[str, Any]:
        t = self.timeout if timeout is None else timeout
        return self._json(
            "block/stat", {"arg": str(cid), "timeout": self._tparam(t)}, timeout=t + 2
        )

    # -- files --------------------------------------------------------------------------------
    def add_bytes(self, data: bytes, *, cid_version: int = 0, pin: bool = True,
                  only_hash: bool = False) -> str:
        files = {"file": ("data", data, "application/octet-stream")}
        return self._add(files, cid_version, pin, only_hash)[-1]["Hash"]

    def add_file(self, path: str | os.PathLike[str], *, cid_version: int = 0, pin: bool = True,
                 only_hash: bool = False) -> str:
        """Let the daemon import a file (streamed from disk); returns its root CID."""
        p = Path(path)
        try:
            f = open(p, "rb")  # noqa: SIM115 - httpx streams it; closed below
        except OSError as exc:
            raise PathNotFoundError(f"{p} cannot be read: {exc.strerror}") from None
        with f:
            files = {"file": (p.name, f, "application/octet-stream")}
            return self._add(files, cid_version, pin, only_hash)[-1]["Hash"]

    def add_directory(self, path: str | os.PathLike[str], *, cid_version: int = 0,
                      pin: bool = True, only_hash: bool = False,
                      shard_split_threshold: int | None = None) -> str:
        """Let the daemon import a folder (multipart with directory parts, streamed).

        ``shard_split_threshold`` (js-ipfs only) makes folders with more entries HAMT shards.
        """
        root = Path(path)
        if not root.is_dir():
            raise PathNotFoundError(f"{root} is not a directory")
        boundary = "dsi-" + os.urandom(12).hex()
        body = _multipart_dir(root, boundary)
        extra = {"shard-split-threshold": shard_split_threshold}
        out = self._add_raw(body, boundary, cid_version, pin, only_hash, extra)
        top = [e for e in out if e.get("Name") == root.name]
        return str((top or out)[-1]["Hash"])

    def _add_params(self, cid_version: int, pin: bool, only_hash: bool) -> dict[str, Any]:
        params: dict[str, Any] = {
            "cid-version": cid_version,
            "pin": pin,
            "only-hash": only_hash,
            "progress": False,
            "cid-base": "base32" if cid_version == 1 else None,
        }
        if cid_version == 1:
            params["raw-leaves"] = True
        return params

    def _add(self, files: dict[str, Any], cid_version: int, pin: bool,
             only_hash: bool) -> list[dict[str, Any]]:
        resp = self._post("add", self._add_params(cid_version, pin, only_hash), files=files)
        return self._ndjson(resp.text)

    def _add_raw(self, body: Iterable[bytes], boundary: str, cid_version: int, pin: bool,
                 only_hash: bool, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        params = {**self._add_params(cid_version, pin, only_hash), **(extra or {})}
        resp = self._post("add", params, content=body, headers=headers)
        return self._ndjson(resp.text)

    def cat(self, cid: str | CID, timeout: float | None = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        resp = self._post("cat", {"arg": str(cid), "timeout": self._tparam(t)}, timeout=t + 2)
        return resp.content

    def ls(self, cid: str | CID, timeout: float | None = None) -> list[dict[str, Any]]:
        t = self.timeout if timeout is None else timeout
        out = self._json("ls", {"arg": str(cid), "timeout": self._tparam(t)}, timeout=t + 2)
        objects = out.get("Objects") or [{}]
        return list(objects[0].get("Links") or [])

    def get(self, cid: str | CID, dest: str | os.PathLike[str],
            timeout: float | None = None) -> Path:
        """``/api/v0/get`` (a tar stream) extracted safely under ``dest``."""
        t = self.timeout if timeout is None else timeout
        target = Path(dest)
        target.mkdir(parents=True, exist_ok=True)
        params = self._params({"arg": str(cid), "timeout": self._tparam(t)})
        try:
            with self._client.stream(
                "POST", self.base + "get", params=params, timeout=httpx.Timeout(t + 2)
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self._raise_for("get", {"arg": str(cid)}, resp)
                with tarfile.open(fileobj=_IterStream(resp.iter_bytes()), mode="r|") as tar:
                    tar.extractall(target, filter="data")
        except (httpx.TransportError, OSError) as exc:
            raise KuboUnavailableError(f"Kubo get {cid} failed: {exc}") from None
        return target / str(cid)

    # -- pins ---------------------------------------------------------------------------------
    def pin_add(self, cid: str | CID, recursive: bool = True,
                timeout: float | None = None) -> None:
        t = self.timeout if timeout is None else timeout
        self._json(
            "pin/add",
            {"arg": str(cid), "recursive": recursive, "timeout": self._tparam(t)},
            timeout=t + 2,
        )

    def pin_rm(self, cid: str | CID) -> None:
        try:
            self._json("pin/rm", {"arg": str(cid)})
        except StorageError as exc:
            if "not pinned" not in str(exc):
                raise

    def pin_ls(self, type: str = "recursive") -> dict[str, str]:
        out = self._json("pin/ls", {"type": type})
        keys = out.get("Keys") or {}
        return {str(parse_cid(k)): str(v.get("Type", "")) for k, v in keys.items()}


class _IterStream:
    """A minimal read()-able file over an iterator of bytes (for streaming tarfile)."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _multipart_dir(root: Path, boundary: str) -> Iterator[bytes]:
    """Kubo's multipart folder upload: a directory part per folder, a file part per file,
    names percent-encoded (Kubo unescapes with QueryUnescape, js-ipfs decodeURIComponent)."""

    def part(rel: str, ctype: str) -> bytes:
        name = urllib.parse.quote(rel, safe="")
        return (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{name}\"\r\nContent-Type: {ctype}\r\n\r\n"
        ).encode()

    def walk(d: Path, rel: str) -> Iterator[bytes]:
        yield part(rel, "application/x-directory") + b"\r\n"
        for entry in sorted(os.scandir(d), key=lambda e: e.name.encode("utf-8")):
            sub = f"{rel}/{entry.name}"
            if entry.is_dir():
                yield from walk(Path(entry.path), sub)
            else:
                yield part(sub, "application/octet-stream")
                with open(entry.path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        yield chunk
                yield b"\r\n"

    yield from walk(root, root.name)
    yield f"--{boundary}--\r\n".encode()


def kubo_reachable(client: KuboClient, timeout: float) -> bool:
    with contextlib.suppress(KuboUnavailableError, StorageError):
        client.version(timeout=timeout)
        return True
    return False


__all__ = ["KuboClient", "api_url", "kubo_reachable"]
