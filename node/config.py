"""Node configuration: one frozen dataclass built from a dict, keyword arguments and env vars.

Precedence (highest first) for the library: explicit keyword arguments, the config dict,
environment variables, defaults. The daemon adds a TOML file below the environment
(``node.daemon.settings``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError

DEFAULT_IPFS_API = "/ip4/127.0.0.1/tcp/5001"
DEFAULT_LISTEN_ADDRS = ("/ip4/0.0.0.0/tcp/4001",)
DEFAULT_DATASETS_PATH = "external/ipfs_datasets_py"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def default_cache_dir() -> Path:
    env = os.environ.get("DSI_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ipfs_accelerate"


def parse_bool(value: Any, name: str) -> bool:
    """Accept real booleans and the usual strings; anything else is a ConfigError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ConfigError(f"{name} must be a boolean (true/false, 1/0, yes/no, on/off), got {value!r}")


def datasets_enabled_mode() -> str:
    """``IPFS_DATASETS_ENABLED`` as one of ``auto``, ``on``, ``off``.

    Anything but auto/1/true/yes/on/0/false/no/off is an error, never a silent ``auto``.
    """
    raw = os.environ.get("IPFS_DATASETS_ENABLED", "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in _TRUE:
        return "on"
    if raw in _FALSE:
        return "off"
    raise ConfigError(
        f"IPFS_DATASETS_ENABLED={os.environ.get('IPFS_DATASETS_ENABLED')!r} is not valid: "
        "use auto, 1/true/yes/on or 0/false/no/off"
    )


def _str_list(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs; immutable once built. Paths are resolved and absolute."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    ipfs_api: str = DEFAULT_IPFS_API
    enable_p2p: bool = False
    enable_audit: bool = True
    enable_provenance: bool = True
    listen_addrs: tuple[str, ...] = DEFAULT_LISTEN_ADDRS
    bootstrap_peers: tuple[str, ...] = ()
    # Empty means open to every peer; otherwise only these peer ids may use our protocols.
    allowed_peers: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    # Seconds for one Kubo RPC call; the availability probe uses its own short timeout.
    kubo_timeout: float = 30.0
    # Accepted for compatibility with the seed document; dsi never simulates P2P.
    explicit_simulation: bool = False

    # -- derived locations (one place, so every component agrees) --------------------------
    @property
    def identity_path(self) -> Path:
        return self.cache_dir / "identity.key"

    @property
    def blocks_dir(self) -> Path:
        return self.cache_dir / "blocks"

    @property
    def provenance_db(self) -> Path:
        return self.cache_dir / "provenance.sqlite"

    @property
    def tasks_db(self) -> Path:
        return self.cache_dir / "tasks.sqlite"

    @property
    def daemon_lock(self) -> Path:
        return self.cache_dir / "node.lock"

    @property
    def control_token_path(self) -> Path:
        return self.cache_dir / "control.token"

    def ensure_dirs(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def replace(self, **changes: Any) -> NodeConfig:
        return build_config(dataclasses.asdict(self), **changes)


_FIELDS = {f.name for f in dataclasses.fields(NodeConfig)}
_BOOL_FIELDS = {"enable_p2p", "enable_audit", "enable_provenance", "explicit_simulation"}
_LIST_FIELDS = {"listen_addrs", "bootstrap_peers", "allowed_peers", "capabilities"}


def _from_env() -> dict[str, Any]:
    env: dict[str, Any] = {}
    if os.environ.get("IPFS_API"):
        env["ipfs_api"] = os.environ["IPFS_API"]
    if os.environ.get("DSI_CACHE_DIR"):
        env["cache_dir"] = os.environ["DSI_CACHE_DIR"]
    return env


def build_config(config: Mapping[str, Any] | NodeConfig | None = None, **kwargs: Any) -> NodeConfig:
    """Merge defaults < environment < ``config`` < keyword arguments into a NodeConfig.

    ``None`` values are treated as "not given", so ``FilesystemHandler(ipfs_api=None)``
    keeps the configured API. Unknown keys raise ConfigError (a typo should not pass silently).
    """
    if isinstance(config, NodeConfig):
        config = dataclasses.asdict(config)
    merged: dict[str, Any] = _from_env()
    for source in (config or {}, kwargs):
        if not isinstance(source, Mapping):
            raise ConfigError(f"config must be a dict, got {type(source).__name__}")
        for key, value in source.items():
            if value is not None:
                merged[key] = value
    unknown = sorted(set(merged) - _FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(_FIELDS))}"
        )
    values: dict[str, Any] = {}
    for key, value in merged.items():
        if key in _BOOL_FIELDS:
            values[key] = parse_bool(value, key)
        elif key in _LIST_FIELDS:
            values[key] = _str_list(value, key)
        elif key == "cache_dir":
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"cache_dir must be a path, got {value!r}")
            values[key] = Path(value).expanduser().resolve()
        elif key == "kubo_timeout":
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"kubo_timeout must be a number of seconds, got {value!r}"
                ) from None
            if values[key] <= 0:
                raise ConfigError("kubo_timeout must be positive")
        elif key == "ipfs_api":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"ipfs_api must be a multiaddr or URL string, got {value!r}")
            values[key] = value
        else:
            values[key] = value
    values.setdefault("cache_dir", default_cache_dir().resolve())
    return NodeConfig(**values)
