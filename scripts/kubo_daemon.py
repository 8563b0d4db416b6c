#!/usr/bin/env python3
"""Start and stop the Kubo-compatible test daemon (js-ipfs 0.66.1) on a free loopback port.

As a module (the test fixtures)::

    from kubo_daemon import KuboDaemon
    with KuboDaemon.start() as d:      # temp repo, free 127.0.0.1 port, ready in ~3 s
        d.api                          # "/ip4/127.0.0.1/tcp/PORT" for ipfs_api
        d.stop(); d.start_again()      # same repo and port: the fault tests use this

As a command (for humans)::

    scripts/kubo_daemon.py run [--port N] [--repo DIR]   # foreground until Ctrl-C
    scripts/kubo_daemon.py check                         # start, print id/version, stop

Install the daemon first: ``scripts/setup --test`` (runs ``npm ci`` in scripts/kubo-compat-daemon).
The daemon runs offline on 127.0.0.1 only: no bootstrap peers, no MDNS, no gateway, no gRPC.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DAEMON_DIR = Path(__file__).resolve().parent / "kubo-compat-daemon"
JSIPFS = DAEMON_DIR / "node_modules" / ".bin" / "jsipfs"
READY_TIMEOUT = 60.0


class DaemonError(RuntimeError):
    """The test daemon is not installed or did not start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_config(port: int) -> dict[str, object]:
    return {
        "Addresses": {
            "API": f"/ip4/127.0.0.1/tcp/{port}",
            "Swarm": ["/ip4/127.0.0.1/tcp/0"],
            "Gateway": [],
            "RPC": "",  # no gRPC server (it would take fixed port 5003)
            "Announce": [],
            "NoAnnounce": [],
        },
        "Bootstrap": [],
        "Discovery": {"MDNS": {"Enabled": False}, "webRTCStar": {"Enabled": False}},
    }


class KuboDaemon:
    """One js-ipfs daemon process with its own repo directory."""

    def __init__(self, repo: Path, port: int, owns_repo: bool) -> None:
        self.repo = repo
        self.port = port
        self.owns_repo = owns_repo
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = repo.parent / f"{repo.name}.log"

    # -- addresses ----------------------------------------------------------------------------
    @property
    def api(self) -> str:
        """The ``ipfs_api`` multiaddr to give dsi."""
        return f"/ip4/127.0.0.1/tcp/{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------
    @classmethod
    def start(cls, repo: str | os.PathLike[str] | None = None, port: int | None = None,
              attempts: int = 3) -> KuboDaemon:
        """Start a daemon on a fresh (or given) repo; retries on a port race. Raises DaemonError."""
        if not JSIPFS.exists():
            raise DaemonError(
                f"the Kubo-compatible test daemon is not installed ({JSIPFS} is missing): "
                "run `scripts/setup --test` (npm ci in scripts/kubo-compat-daemon)"
            )
        last: Exception | None = None
        for _ in range(attempts):
            owns = repo is None
            base = Path(tempfile.mkdtemp(prefix="dsi-kubo-")) if owns else None
            repo_path = base / "repo" if base is not None else Path(repo)  # type: ignore[arg-type]
            daemon = cls(repo_path, port or free_port(), owns)
            try:
                daemon._spawn()
                return daemon
            except DaemonError as exc:
                last = exc
                daemon.stop()
                daemon.cleanup()
                if port is not None:
                    break
        raise DaemonError(f"the test daemon did not start: {last}")

    def _spawn(self) -> None:
        self.repo.parent.mkdir(parents=True, exist_ok=True)
        cfg = self.repo.parent / f"{self.repo.name}-init-config.json"
        cfg.write_text(json.dumps(_init_config(self.port)))
        env = dict(os.environ, IPFS_PATH=str(self.repo), DEBUG="", NODE_OPTIONS="")
        cmd = [str(JSIPFS), "daemon", "--offline", "--enable-preload=false"]
        if not (self.repo / "config").exists():
            cmd += ["--init-profile", "test", "--init-config", str(cfg)]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DaemonError(f"daemon exited with {self.proc.returncode}: {self._tail()}")
            text = self._tail()
            if "EADDRINUSE" in text:  # js-ipfs hangs instead of exiting on a taken port
                raise DaemonError(f"port {self.port} is taken")
            if self._answers():
                return
            time.sleep(0.1)
        raise DaemonError(f"not ready after {READY_TIMEOUT:.0f} s: {self._tail()}")

    def _answers(self) -> bool:
        req = urllib.request.Request(self.url + "/api/v0/version", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL); the repo is kept for start_again()."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        lock = self.repo / "repo.lock"  # a hard kill leaves the repo lock behind
        if lock.is_dir():
            shutil.rmtree(lock, ignore_errors=True)
        else:
            lock.unlink(missing_ok=True)

    def start_again(self) -> None:
        """Restart on the same repo and port (the content added before is still there)."""
        if self.running:
            return
        self._spawn()

    def cleanup(self) -> None:
        self.stop()
        if self.owns_repo:
            shutil.rmtree(self.repo.parent, ignore_errors=True)

    def __enter__(self) -> KuboDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a daemon in the foreground until Ctrl-C")
    run.add_argument("--port", type=int, default=None)
    run.add_argument("--repo", default=None, help="repo directory (default: a temp dir)")
    sub.add_parser("check", help="start a daemon, print its id and version, stop it")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            with KuboDaemon.start() as d:
                for cmd in ("id", "version"):
                    req = urllib.request.Request(f"{d.url}/api/v0/{cmd}", method="POST")
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        print(cmd, resp.read().decode())
            return 0
        d = KuboDaemon.start(repo=args.repo, port=args.port)
    except DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"daemon ready: ipfs_api={d.api} url={d.url} repo={d.repo} (Ctrl-C stops it)")
    try:
        while d.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
