"""Is the IPFS side available? ``IPFS_DATASETS_ENABLED``, ``IPFS_DATASETS_PATH`` and a Kubo probe.

"Available" means a Kubo-compatible RPC API answers at ``ipfs_api`` (config, ``IPFS_API``, or
``/ip4/127.0.0.1/tcp/5001``). The probe uses a short timeout and its answer is cached for
``CACHE_TTL`` seconds, so a daemon started or stopped later is noticed. The optional
ipfs_datasets_py checkout at ``IPFS_DATASETS_PATH`` is only reported; nothing depends on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node.config import DEFAULT_DATASETS_PATH, NodeConfig, build_config, datasets_enabled_mode
from node.errors import ConfigError, KuboUnavailableError, StorageError

CACHE_TTL = 2.0
PROBE_TIMEOUT = 1.0

_cache: dict[tuple[str, str, str], tuple[float, dict[str, Any]]] = {}
_cache_lock = threading.Lock()


def datasets_path() -> Path:
    """``IPFS_DATASETS_PATH`` as an absolute path.

    A relative path is taken from the source checkout's root when dsi runs from one (where
    ``external/`` lives), else from the current directory.
    """
    raw = os.environ.get("IPFS_DATASETS_PATH", "").strip() or DEFAULT_DATASETS_PATH
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "external").is_dir():
        return checkout / p
    return Path.cwd() / p


def probe_kubo(ipfs_api: str, timeout: float = PROBE_TIMEOUT) -> tuple[dict[str, Any] | None, str]:
    """(info, error): info has agent_version, version, peer_id when the API answers."""
    from node.storage import KuboClient  # httpx import only when probing

    try:
        client = KuboClient(ipfs_api, timeout)
    except ConfigError as exc:
        return None, str(exc)
    try:
        ident = client.id(timeout=timeout)
        ver = client.version(timeout=timeout)
    except (KuboUnavailableError, StorageError) as exc:
        return None, str(exc)
    finally:
        client.close()
    return {
        "agent_version": ident.get("AgentVersion"),
        "version": ver.get("Version"),
        "peer_id": ident.get("ID"),
    }, ""


def get_status(
    config: Mapping[str, Any] | NodeConfig | None = None, **kwargs: Any
) -> dict[str, Any]:
    """The status dict of ``get_datasets_status()``; raises ConfigError on a bad env value."""
    mode = datasets_enabled_mode()
    cfg = build_config(config, **kwargs)
    path = datasets_path()
    key = (mode, cfg.ipfs_api, str(path))
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < CACHE_TTL:
            return dict(hit[1])
    status: dict[str, Any] = {
        "enabled": mode != "off",
        "mode": mode,
        "available": False,
        "path": str(path),
        "path_exists": path.is_dir(),
        "ipfs_api": cfg.ipfs_api,
        "backend": "local",
        "kubo_agent_version": None,
        "kubo_version": None,
        "cache_dir": str(cfg.cache_dir),
    }
    if mode == "off":
        status["reason"] = (
            "disabled by IPFS_DATASETS_ENABLED; content is stored in the local block store only"
        )
    else:
        info, error = probe_kubo(cfg.ipfs_api)
        if info is None:
            status["reason"] = (
                f"no Kubo RPC API answers at {cfg.ipfs_api} ({error}); content is stored in "
                "the local block store and pushed by sync() once the daemon runs"
            )
        else:
            status.update(
                available=True,
                backend="kubo+local",
                kubo_agent_version=info["agent_version"],
                kubo_version=info["version"],
                kubo_peer_id=info["peer_id"],
            )
    with _cache_lock:
        _cache[key] = (time.monotonic(), status)
    return dict(status)


def is_available(config: Mapping[str, Any] | NodeConfig | None = None, **kwargs: Any) -> bool:
    return bool(get_status(config, **kwargs)["available"])


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
