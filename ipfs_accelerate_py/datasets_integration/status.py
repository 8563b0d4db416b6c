"""``is_datasets_available()`` and ``get_datasets_status()`` of the seed document.

``get_datasets_status()`` returns at least: ``available`` (a Kubo RPC API answers),
``enabled`` and ``mode`` (from ``IPFS_DATASETS_ENABLED``: auto, on, off; any other value is a
ConfigError), ``path`` (``IPFS_DATASETS_PATH``, default ``external/ipfs_datasets_py``) and
``path_exists``, ``reason`` when unavailable, ``backend`` ("kubo+local" or "local"),
``ipfs_api``, and ``kubo_agent_version`` / ``kubo_version`` when reachable. The probe is short
and its answer is cached for about two seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node.config import NodeConfig
from node.status import get_status, is_available


def is_datasets_available(
    config: Mapping[str, Any] | NodeConfig | None = None, **kwargs: Any
) -> bool:
    """True when the IPFS side (a Kubo-compatible RPC API) answers and is not switched off."""
    return is_available(config, **kwargs)


def get_datasets_status(
    config: Mapping[str, Any] | NodeConfig | None = None, **kwargs: Any
) -> dict[str, Any]:
    """The status dict described in the module docstring (a fresh copy each call)."""
    return get_status(config, **kwargs)


__all__ = ["get_datasets_status", "is_datasets_available"]
