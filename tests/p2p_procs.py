"""Run ``tests/p2p_peer.py`` nodes (and other JSON-line programs) as separate OS processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "tests" / "p2p_peer.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EventProcess:
    """A child process that prints one JSON object per line on stdout; a thread collects them
    in ``events`` (a line that is not JSON becomes an ``unparsed`` event) and stderr goes to
    ``<log_dir>/<name>.stderr``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        *,
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.rstrip("\n")}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == kind]

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        self._stderr.close()


class InteropPeer(EventProcess):
    """A peer written with another implementation (``tests/interop/``), followed from a trio
    test: ``wait`` polls its events, so the trio loop and in-process nodes keep running."""

    def __init__(self, label: str, role: str, argv: list[str], log_dir: Path, **kw: Any) -> None:
        super().__init__(f"{label}-{role}", argv, log_dir, **kw)
        self.label = label
        self.role = role

    def all(self, name: str) -> list[dict[str, Any]]:
        return self.of(name)

    def _describe(self) -> str:
        with self._cond:
            tail = [e for e in self.events if e.get("event") not in ("offer", "request")][-12:]
        return f"exit={self.proc.poll()}; last events: {tail}; stderr tail: {self.stderr_tail()!r}"

    async def wait(
        self,
        name: str,
        timeout: float = 20.0,
        predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
    ) -> dict[str, Any]:
        """The first ``name`` event matching ``predicate``; fails on an ``error`` event, on
        exit without it, or after ``timeout`` seconds."""
        who = f"{self.label} {self.role}"
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            if exited:
                self._reader.join(timeout=2)  # take in the last lines before judging
            for event in self.all(name):
                if predicate(event):
                    return event
            if self.all("error"):
                raise AssertionError(f"{who} reported an error; {self._describe()}")
            if exited:
                raise AssertionError(f"{who} exited without {name!r}; {self._describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{who}: no {name!r} event within {timeout}s; {self._describe()}"
                )
            await trio.sleep(0.05)


class PeerProcess(EventProcess):
    """One ``tests/p2p_peer.py`` node; ``wait_for`` scans its events with a timeout."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        super().__init__(
            name,
            [sys.executable, str(PEER_SCRIPT), *args],
            log_dir,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.ready: dict[str, Any] = {}

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str = ""
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.events)):
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(
            f"{self.name}: no {what or 'matching event'} within {timeout}s "
            f"(exit={self.proc.poll()}); stderr tail: {self.stderr_tail()}"
        )

    def wait_event(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for(lambda e: e["event"] == kind, timeout, kind)

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        self.ready = self.wait_event("ready", timeout)
        return self.ready

    @property
    def addr(self) -> str:
        return str(self.ready["addrs"][0])

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])


class Swarm:
    """The processes of one test; ``close()`` stops every one of them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.peers: list[PeerProcess] = []

    def start(
        self, name: str, role: str, *extra: str, listen: str | None = None, data: str = ""
    ) -> PeerProcess:
        """Start a node; ``data`` names its data directory (default: ``name``)."""
        args = ["--role", role, "--cache-dir", str(self.base / (data or name)), *extra]
        if listen:
            args += ["--listen", listen]
        peer = PeerProcess(name, args, self.base / "logs")
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.stop()
