"""Shared fixtures: the real Kubo-compatible daemon, a private daemon for fault tests, cache dirs.

The daemon fixtures never skip: if the daemon is not installed or does not start, the tests
that need it FAIL with the reason (install it with ``scripts/setup --test``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kubo_daemon import DAEMON_DIR, DaemonError, KuboDaemon  # noqa: E402


def _start_daemon() -> KuboDaemon:
    try:
        return KuboDaemon.start()
    except DaemonError as exc:
        pytest.fail(f"the Kubo-compatible test daemon is required and did not start: {exc}",
                    pytrace=False)


@pytest.fixture(scope="session")
def kubo() -> Iterator[KuboDaemon]:
    """One js-ipfs daemon for the whole session (``kubo.api`` is the ipfs_api multiaddr).

    Do not stop it in a test: use ``kubo_private`` for that.
    """
    daemon = _start_daemon()
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
def kubo_private() -> Iterator[KuboDaemon]:
    """A daemon of this test's own, free to ``stop()`` and ``start_again()`` (same repo/port)."""
    daemon = _start_daemon()
    try:
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A fresh dsi cache_dir (blocks, identity, databases) for one test."""
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def unixfs_oracle() -> Callable[..., str]:
    """Root CID of a file or folder by the js UnixFS importer (independent of our code).

    ``shard_at=N`` makes it HAMT-shard every folder of at least N entries.
    """
    script = DAEMON_DIR / "unixfs-oracle.mjs"
    if not (DAEMON_DIR / "node_modules" / "ipfs-unixfs-importer").is_dir():
        pytest.fail("ipfs-unixfs-importer is missing: run `scripts/setup --test`", pytrace=False)

    def oracle(path: Path, cid_version: int = 0, shard_at: int | None = None) -> str:
        extra = [] if shard_at is None else [str(shard_at)]
        out = subprocess.run(
            ["node", str(script), str(path), str(cid_version), *extra],
            check=True, capture_output=True, text=True, timeout=120,
            env=dict(os.environ, NODE_OPTIONS=""),
        )
        return out.stdout.strip()

    return oracle
