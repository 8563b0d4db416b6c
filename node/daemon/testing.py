"""Drive real ``dsi-node`` processes from tests (ours, and integrators' own).

``NodeProcess`` starts ``dsi-node run`` on a data directory as a subprocess, waits until its
control API answers, and stops it (SIGTERM, then SIGKILL as a last resort); ``run_cli`` runs
one CLI command. Processes are started with ``python -m node.cli`` and the package's own
folder on ``PYTHONPATH``, so an uninstalled checkout works too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import node
from node.config import build_config
from node.daemon.client import ControlClient, read_control_file

PACKAGE_ROOT = Path(node.__file__).resolve().parents[1]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSI_")}
    env.pop("IPFS_API", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120,
            check: bool = True, cwd: str | Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``dsi-node`` command; ``check`` raises with its output when it fails."""
    proc = subprocess.run(cli_command(*args), env=child_env(env), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or PACKAGE_ROOT, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"dsi-node {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_cli_json(*args: str, **kwargs: Any) -> Any:
    return json.loads(run_cli(*args, "--json", **kwargs).stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    """``dsi-node --cache-dir DIR run ARGS`` as a child process."""

    def __init__(self, cache_dir: str | Path, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, *, control_port: int = 0) -> None:
        self.cache_dir = Path(cache_dir)
        self.args = list(args)
        self.env = dict(env or {})
        self.control_port = control_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.cache_dir.parent / f"{self.cache_dir.name}.log"
        self._log: Any = None

    def start(self) -> NodeProcess:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        argv = cli_command("--cache-dir", str(self.cache_dir), "run",
                           "--control-addr", f"127.0.0.1:{self.control_port}", *self.args)
        self.proc = subprocess.Popen(argv, env=child_env(self.env), stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 60) -> NodeProcess:
        """Until ``control.json`` names this process and the API answers."""
        assert self.proc is not None
        cfg = build_config(cache_dir=self.cache_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"dsi-node run exited with {self.proc.returncode}:\n{self.log()}")
            info = read_control_file(cfg)
            if info is not None and info.get("pid") == self.proc.pid:
                client = ControlClient.connect(cfg)
                if client is not None:
                    return self
            time.sleep(0.05)
        raise AssertionError(f"dsi-node run not ready after {timeout} s:\n{self.log()}")

    def client(self) -> ControlClient:
        client = ControlClient.connect(build_config(cache_dir=self.cache_dir))
        if client is None:
            raise AssertionError(f"no daemon answers on {self.cache_dir}:\n{self.log()}")
        return client

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in ``timeout`` (then returns None)."""
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    return None
            return self.proc.returncode
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text("utf-8", "replace")
        return ""

    def __enter__(self) -> NodeProcess:
        return self.start().wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
