"""Shared plumbing of the sync facade classes: config merging and the per-cache_dir node."""

from __future__ import annotations

from typing import Any

from node.config import NodeConfig, build_config
from node.services import NodeServices, acquire_services, release_services


class Facade:
    """Base of the public classes: ``Cls(config=None, **same_keys_as_kwargs)``.

    Objects with the same ``cache_dir`` in one process share one node. ``close()`` (or leaving
    a ``with`` block) releases it; the last release stops the P2P host if one was started.
    """

    def __init__(self, config: dict[str, Any] | NodeConfig | None = None, **kwargs: Any) -> None:
        self.config: NodeConfig = build_config(config, **kwargs)
        self._services: NodeServices = acquire_services(self.config)
        self._released = False

    @property
    def services(self) -> NodeServices:
        return self._services

    def close(self) -> None:
        if not self._released:
            self._released = True
            release_services(self._services)

    def __enter__(self) -> Facade:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
