"""Shared helpers of the P2P tests: start real nodes on 127.0.0.1 and wait with timeouts."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from node.config import build_config
from node.p2p import Node, P2PSettings, open_node

LOOPBACK = "/ip4/127.0.0.1/tcp/0"

# Short leases and fast loops keep the suite quick; every wait below has a timeout.
FAST = P2PSettings(
    request_timeout=5.0,
    dial_timeout=3.0,
    reap_interval=0.2,
    reannounce_interval=1.0,
    bootstrap_backoff_initial=0.1,
    bootstrap_backoff_max=1.0,
    bootstrap_check_interval=0.2,
    list_min_interval=0.2,
    list_background_interval=1.0,
)


def node_config(cache_dir: Path, **kw: Any) -> Any:
    values: dict[str, Any] = {
        "cache_dir": str(cache_dir),
        "enable_p2p": True,
        "listen_addrs": [LOOPBACK],
        "enable_provenance": False,
    }
    values.update(kw)
    return build_config(values)


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until truthy; fail (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(0.02)


@asynccontextmanager
async def start_nodes(
    base: Path,
    links: Sequence[Sequence[int]],
    *,
    settings: P2PSettings = FAST,
    extra: dict[int, dict[str, Any]] | None = None,
) -> AsyncIterator[list[Node]]:
    """Start ``len(links)`` nodes; node i bootstraps to the nodes listed in ``links[i]``
    (which must have lower indexes)."""
    extra = extra or {}
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i, targets in enumerate(links):
            boot = [nodes[t].listen_addrs()[0] for t in targets]
            cfg = node_config(base / f"n{i}", bootstrap_peers=boot, **extra.get(i, {}))
            nodes.append(await stack.enter_async_context(open_node(cfg, settings=settings)))
        for i, targets in enumerate(links):
            for t in targets:
                pid = nodes[t].peer_id
                await wait_for(
                    lambda i=i, pid=pid: pid in nodes[i].mesh_peers(),
                    what=f"node {t} in node {i}'s gossip mesh",
                )
        yield nodes
