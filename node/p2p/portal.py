"""The sync face of the P2P node: the trio node runs in one background thread.

``P2PHandle.start(services)`` starts a blocking portal (``anyio.from_thread.
start_blocking_portal(backend="trio")``), enters ``open_node`` inside it and returns a handle
whose methods are plain synchronous calls, safe from any thread. ``stop()`` leaves the node
and the portal; it is quick (well under a second) and idempotent.

The facade (``WorkflowCoordinator``) routes to it: ``get_next_task`` always (local queue and
remote offers are weighed together), ``complete_task`` / ``fail_task`` / ``heartbeat`` /
``get_task_status`` for any task (remote tasks go to their owner, others to the local queue).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from node.errors import ConfigError, DatasetsError

if TYPE_CHECKING:
    from node.p2p.node import Node
    from node.p2p.settings import P2PSettings
    from node.services import NodeServices


class P2PHandle:
    def __init__(
        self,
        portal_cm: AbstractContextManager[BlockingPortal],
        portal: BlockingPortal,
        node_cm: AbstractContextManager[Node],
        node: Node,
    ) -> None:
        self._portal_cm = portal_cm
        self._portal = portal
        self._node_cm = node_cm
        self._node = node
        self._lock = threading.Lock()
        self._stopped = False

    @classmethod
    def start(cls, services: NodeServices, settings: P2PSettings | None = None) -> P2PHandle:
        """Start the node of ``services`` (its config must have ``enable_p2p``)."""
        if not services.config.enable_p2p:
            raise ConfigError("P2P is off for this node: set enable_p2p=True to start it")
        from node.p2p.node import open_node  # imports libp2p: only when P2P starts

        portal_cm = start_blocking_portal(backend="trio")
        portal = portal_cm.__enter__()
        try:
            node_cm = portal.wrap_async_context_manager(
                open_node(services=services, settings=settings)
            )
            node = node_cm.__enter__()
        except BaseException as exc:
            portal_cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return cls(portal_cm, portal, node_cm, node)

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return not self._stopped

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._node_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._stopped:
            raise DatasetsError("the P2P node is stopped; create a new coordinator")
        return self._portal.call(fn, *args)

    # ------------------------------------------------------------------ node facts
    @property
    def node(self) -> Node:
        """The trio node (call its async methods only through ``portal``)."""
        return self._node

    @property
    def portal(self) -> BlockingPortal:
        return self._portal

    @property
    def peer_id(self) -> str:
        return self._node.peer_id

    def listen_addrs(self) -> list[str]:
        return self._node.listen_addrs()

    def status(self) -> dict[str, Any]:
        """peer_id, listen_addrs (with /p2p/<id>), connected_peers, mesh_peers, task_counts..."""
        return self._call(self._node.status)

    def connect(self, addr: str) -> str:
        return self._call(self._node.connect, addr)

    def remote_offers(self) -> list[dict[str, object]]:
        return self._portal.call(self._node.remote_offers)  # type: ignore[arg-type]

    def refresh_offers(self, capabilities: Iterable[str] | None = None) -> int:
        async def run() -> int:
            return await self._node.refresh_offers(capabilities, force=True)

        return self._call(run)

    def holds(self, task_id: str) -> bool:
        """True when ``task_id`` is a remote task this node holds a lease on."""
        return self._node.holds(task_id)

    # ------------------------------------------------------------------ tasks
    def get_next_task(
        self, worker_id: str, capabilities: Iterable[str] | None = None
    ) -> dict[str, Any] | None:
        caps = list(capabilities) if capabilities is not None else None
        return self._call(self._node.get_next_task, worker_id, caps)

    def complete_task(
        self,
        task_id: str,
        result: Any,
        lease_id: str | None = None,
        result_cid: str | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            return await self._node.complete_task(task_id, result, lease_id, result_cid, worker_id)

        return self._call(run)

    def fail_task(
        self,
        task_id: str,
        error: Any,
        retryable: bool = True,
        lease_id: str | None = None,
        worker_id: str | None = None,
    ) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            return await self._node.fail_task(task_id, error, retryable, lease_id, worker_id)

        return self._call(run)

    def heartbeat(
        self, task_id: str, lease_id: str | None = None, worker_id: str | None = None
    ) -> float:
        return self._call(self._node.heartbeat, task_id, lease_id, worker_id)

    def get_task_status(self, task_id: str) -> dict[str, Any]:
        return self._call(self._node.get_task_status, task_id)
