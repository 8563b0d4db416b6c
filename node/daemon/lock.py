"""One ``dsi-node run`` per data directory: an exclusive ``fcntl.flock`` on ``cfg.daemon_lock``.

flock is released by the kernel when the process dies (even by SIGKILL), so a crashed daemon
never leaves a stale lock behind; the file itself is never deleted (deleting a lock file races
with a process that just opened it). The holder writes its pid and role into the file so
the refusal message can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from node.errors import NodeRunningError

_ROLES = {"run": "dsi-node run", "worker": "dsi-node worker with its own P2P host"}


class DaemonLock:
    """``role`` says who holds it ("run" or "worker"), for the refusal message."""

    def __init__(self, path: Path, role: str = "run") -> None:
        self.path = path
        self.role = role
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, role = _read_holder(fd)
            os.close(fd)
            who = f" (pid {pid})" if pid else ""
            raise NodeRunningError(
                f"another {_ROLES.get(role, 'dsi-node run')}{who} is already using the data "
                f"directory {self.path.parent}; stop it first, or start this one with another "
                "--cache-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.role}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DaemonLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> tuple[int | None, str]:
    try:
        parts = os.pread(fd, 64, 0).decode().split()
        return (int(parts[0]) if parts else None), (parts[1] if len(parts) > 1 else "run")
    except (OSError, ValueError, UnicodeDecodeError):
        return None, "run"
