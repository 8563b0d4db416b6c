"""Keep-alive connections between requests: parked on a selector, not on a thread.

The control API serves each request on a pool thread. Were a thread to wait for a connection's
next request, quiet keep-alive clients would hold the whole pool; instead the connection is
parked here, and handed back when its next request (or its close) arrives, or shut after
``timeout`` seconds of silence.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Resume = Callable[[socket.socket, Any], None]
Close = Callable[[socket.socket], None]


class IdleConnections:
    """Parked connections and the thread that watches them (``run``)."""

    def __init__(self, resume: Resume, close: Close, *, timeout: float,
                 max_parked: int) -> None:
        self._resume = resume  # called on the watcher thread when a parked socket is readable
        self._close = close
        self.timeout = timeout
        self._max_parked = max_parked
        self._selector = selectors.DefaultSelector()
        self._since: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closing = False
        self._watching = False

    def park(self, sock: socket.socket, address: Any) -> None:
        with self._lock:
            if self._closing or len(self._since) >= self._max_parked:
                self._close(sock)
                return
            self._since[sock] = time.monotonic()
            self._selector.register(sock, selectors.EVENT_READ, address)
        self._wake()  # portable: not every selector sees a new fd in the middle of a select

    def run(self) -> None:
        """Watch until ``close``: resume readable connections, shut stale ones."""
        with self._lock:
            if self._closing:
                return
            self._watching = True
        while not self._closing:
            ready = self._selector.select(timeout=1.0)
            resumed: list[tuple[socket.socket, Any]] = []
            with self._lock:
                for key, _ in ready:
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        sock: socket.socket = key.fileobj  # type: ignore[assignment]
                        self._forget(sock)
                        resumed.append((sock, key.data))
                now = time.monotonic()
                stale = [s for s, since in self._since.items() if now - since > self.timeout]
                for sock in stale:
                    self._forget(sock)
            for sock, address in resumed:
                self._resume(sock, address)  # a request, or the client's close (EOF)
            for sock in stale:
                self._close(sock)
        with self._lock:
            self._release()

    def close(self) -> None:
        """Shut every parked connection; the watcher exits within a moment."""
        self._closing = True
        self._wake()
        with self._lock:
            if self._watching:
                self._close_all()  # the watcher releases the rest on its way out
            else:
                self._release()

    def _release(self) -> None:
        self._close_all()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _forget(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        self._since.pop(sock, None)

    def _close_all(self) -> None:
        for sock in list(self._since):
            self._forget(sock)
            self._close(sock)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
