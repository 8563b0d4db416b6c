"""Daemon and CLI settings: defaults < TOML file < environment < flags, with each value's source.

One table (``KEYS``) drives everything that names a setting: the TOML parser, the environment
variables, the command-line flags, ``dsi-node config show``, the commented file ``dsi-node init``
writes and the config reference in ``docs/config.md`` (a test keeps the doc in step). Adding a
key means adding one ``Key`` here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.config import (
    DEFAULT_IPFS_API,
    DEFAULT_LISTEN_ADDRS,
    NodeConfig,
    build_config,
    default_cache_dir,
    parse_bool,
)
from node.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONTROL_ADDR = "127.0.0.1:5080"
CONFIG_FILE_NAME = "config.toml"
CONFIG_ENV = "DSI_CONFIG"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_LOG_LEVELS = ("debug", "info", "warning", "error")


# -- value parsers: raw value (TOML value, env string or flag value) -> typed value -----------
def _as_bool(value: Any, name: str) -> bool:
    return parse_bool(value, name)


def _as_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):  # env vars and single flags: comma separated
        return [v for v in (p.strip() for p in value.split(",")) if v]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        out: list[str] = []
        for v in value:  # a flag given twice may itself hold commas: accept both spellings
            out.extend(p.strip() for p in v.split(",") if p.strip())
        return out
    raise ConfigError(f"{name} must be a list of strings, got {value!r}")


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if out <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")
    return out


def _as_str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


def _as_path(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{name} must be a path, got {value!r}")
    return str(Path(value).expanduser().resolve())


def _as_log_level(value: Any, name: str) -> str:
    level = _as_str(value, name).lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"{name} must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return level


def parse_control_addr(value: str, name: str = "control_addr") -> tuple[str, int]:
    """``host:port`` (``[::1]:port`` for IPv6); the host must be a loopback address."""
    text = _as_str(value, name)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{name} must be HOST:PORT (e.g. {DEFAULT_CONTROL_ADDR}), got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    if host not in _LOOPBACK_HOSTS:
        raise ConfigError(
            f"{name} host must be a loopback address (127.0.0.1, ::1 or localhost), got "
            f"{host!r}: the control API is for this machine only"
        )
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{name} port must be a number, got {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} port must be 0-65535 (0 = any free port), got {port}")
    return ("127.0.0.1" if host == "localhost" else host), port


def _as_control_addr(value: Any, name: str) -> str:
    host, port = parse_control_addr(value, name)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_multiaddrs(values: list[str], name: str, need_peer_id: bool) -> None:
    import multiaddr  # light (no libp2p import); validates early with a clear message

    for v in values:
        try:
            ma = multiaddr.Multiaddr(v)
        except Exception as exc:  # the library raises several unrelated classes
            raise ConfigError(f"{name}: {v!r} is not a valid multiaddr ({exc})") from None
        if need_peer_id and "/p2p/" not in str(ma):
            raise ConfigError(
                f"{name}: {v!r} has no /p2p/<peer id>; give the full address that "
                "`dsi-node init` or `dsi-node id` prints on that machine"
            )


def _check_peer_ids(values: list[str], name: str) -> None:
    from node.identity import public_key_from_peer_id

    for v in values:
        try:
            public_key_from_peer_id(v)
        except Exception:
            raise ConfigError(
                f"{name}: {v!r} is not an Ed25519 peer id (12D3KooW...); "
                "`dsi-node id` prints a node's peer id"
            ) from None


@dataclass(frozen=True)
class Key:
    """One setting: its TOML name, parser, environment variable, flag and documentation."""

    name: str
    kind: str  # for docs: bool, list, string, path, number, address
    parse: Callable[[Any, str], Any]
    default: Callable[[], Any]
    env: str
    flag: str
    doc: str
    example: str = ""


KEYS: tuple[Key, ...] = (
    Key("cache_dir", "path", _as_path, lambda: str(default_cache_dir()), "DSI_CACHE_DIR",
        "--cache-dir",
        "Data directory: identity key, blocks, provenance and task databases, control token. "
        "The default config file is <cache_dir>/config.toml.",
        "~/.cache/ipfs_accelerate"),
    Key("ipfs_api", "string", _as_str, lambda: DEFAULT_IPFS_API, "IPFS_API", "--ipfs-api",
        "Kubo RPC API (multiaddr or http URL). Used when it answers; everything also works "
        "without it.", DEFAULT_IPFS_API),
    Key("enable_p2p", "bool", _as_bool, lambda: False, "DSI_ENABLE_P2P", "--enable-p2p",
        "Start the libp2p host (gossipsub task announcements, /dsi/task/1.0.0). Off: no socket "
        "is opened except the control API.", "true"),
    Key("listen_addrs", "list", _as_list, lambda: list(DEFAULT_LISTEN_ADDRS), "DSI_LISTEN_ADDRS",
        "--listen",
        "libp2p listen multiaddrs (TCP). Port 0 picks a free port at start.",
        '["/ip4/0.0.0.0/tcp/4001"]'),
    Key("bootstrap_peers", "list", _as_list, list, "DSI_BOOTSTRAP_PEERS", "--bootstrap",
        "Peers to dial at start and redial when the connection drops: full multiaddrs ending "
        "in /p2p/<peer id>.",
        '["/ip4/192.0.2.10/tcp/4001/p2p/12D3KooW..."]'),
    Key("allowed_peers", "list", _as_list, list, "DSI_ALLOWED_PEERS", "--allow-peer",
        "Allow-list of peer ids. Empty: any peer may use the task protocol; otherwise every "
        "other peer is refused.", '["12D3KooW..."]'),
    Key("capabilities", "list", _as_list, list, "DSI_CAPABILITIES", "--capabilities",
        "This node's worker capabilities (e.g. GPU, CUDA); the default for `dsi-node worker`.",
        '["GPU", "CUDA"]'),
    Key("kubo_timeout", "number", _as_float, lambda: 30.0, "DSI_KUBO_TIMEOUT", "--kubo-timeout",
        "Seconds allowed for one Kubo RPC call.", "30"),
    Key("enable_audit", "bool", _as_bool, lambda: True, "DSI_ENABLE_AUDIT", "--enable-audit",
        "Record audit events (DatasetsManager.log_event).", "true"),
    Key("enable_provenance", "bool", _as_bool, lambda: True, "DSI_ENABLE_PROVENANCE",
        "--enable-provenance",
        "Record provenance (worker executions, inference, transformations).", "true"),
    Key("control_addr", "address", _as_control_addr, lambda: DEFAULT_CONTROL_ADDR,
        "DSI_CONTROL_ADDR", "--control-addr",
        "Control API address, loopback only. Port 0 picks a free port; the daemon writes the "
        "chosen address to <cache_dir>/control.json, where the CLI finds it.",
        DEFAULT_CONTROL_ADDR),
    Key("shutdown_grace", "number", _as_float, lambda: 5.0, "DSI_SHUTDOWN_GRACE",
        "--shutdown-grace",
        "Seconds `run` waits at SIGINT/SIGTERM for workers to finish leased tasks before it "
        "hands the remaining leases back (fail, retryable).", "5"),
    Key("log_level", "string", _as_log_level, lambda: "info", "DSI_LOG_LEVEL", "--log-level",
        "debug, info, warning or error.", "info"),
)
KEYS_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
_NODE_KEYS = ("cache_dir", "ipfs_api", "enable_p2p", "listen_addrs", "bootstrap_peers",
              "allowed_peers", "capabilities", "kubo_timeout", "enable_audit", "enable_provenance")


@dataclass(frozen=True)
class Settings:
    """The effective settings and where each value came from."""

    values: dict[str, Any]
    sources: dict[str, str]  # "default", "file:<path>", "env:NAME" or "flag:--name"
    config_file: Path | None  # the file that was read (None: none was found)
    node: NodeConfig = field(repr=False)

    @property
    def config(self) -> NodeConfig:
        return self.node

    @property
    def cache_dir(self) -> Path:
        return self.node.cache_dir

    @property
    def control_host(self) -> str:
        return parse_control_addr(self.values["control_addr"])[0]

    @property
    def control_port(self) -> int:
        return parse_control_addr(self.values["control_addr"])[1]

    @property
    def control_file(self) -> Path:
        return control_file_path(self.node)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def describe(self) -> list[dict[str, Any]]:
        """Rows for ``config show``: key, value, source, env, flag."""
        return [
            {"key": k.name, "value": self.values[k.name], "source": self.sources[k.name],
             "env": k.env, "flag": k.flag}
            for k in KEYS
        ]


def control_file_path(cfg: NodeConfig) -> Path:
    """Where a running daemon publishes its control API address (and pid, peer id)."""
    return cfg.cache_dir / "control.json"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (create one with `dsi-node init`)") \
            from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS_BY_NAME))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(KEYS_BY_NAME)}"
        )
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every key: defaults < config file < environment < flags.

    ``flags`` maps key names to values given on the command line (``None`` = not given).
    The config file is ``config_path`` if given, else ``$DSI_CONFIG``, else
    ``<cache_dir>/config.toml`` when it exists (cache_dir from flags/env/default).
    """
    env = os.environ if environ is None else environ
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(given) - set(KEYS_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")

    # Locate the file first: an explicit path must exist, the default one may be absent.
    explicit = config_path or env.get(CONFIG_ENV) or None
    if explicit:
        file_path: Path | None = Path(explicit).expanduser().resolve()
    else:
        cache_guess = given.get("cache_dir") or env.get("DSI_CACHE_DIR") or default_cache_dir()
        candidate = Path(cache_guess).expanduser().resolve() / CONFIG_FILE_NAME
        file_path = candidate if candidate.is_file() else None
    file_values = _read_toml(file_path) if file_path is not None else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        raw: Any
        if key.name in given:
            raw, src = given[key.name], f"flag:{key.flag}"
        elif env.get(key.env, "").strip():
            raw, src = env[key.env], f"env:{key.env}"
        elif key.name in file_values:
            raw, src = file_values[key.name], f"file:{file_path}"
        else:
            raw, src = key.default(), "default"
        try:
            values[key.name] = key.parse(raw, key.name)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from {src})") from None
        sources[key.name] = src

    for name, need_id in (("listen_addrs", False), ("bootstrap_peers", True)):
        try:
            _check_multiaddrs(values[name], name, need_id)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from {sources[name]})") from None
    try:
        _check_peer_ids(values["allowed_peers"], "allowed_peers")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from {sources['allowed_peers']})") from None

    node_cfg = build_config({k: values[k] for k in _NODE_KEYS})
    return Settings(values=values, sources=sources, config_file=file_path, node=node_cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        return "[\n" + "".join(f"    {_toml_value(v)},\n" for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_config_file(settings: Settings, *, include_cache_dir: bool = False) -> str:
    """A commented TOML file holding the current values (what ``dsi-node init`` writes).

    Keys still at their default are written commented out, so a later change of a default in
    a new release reaches this node; keys set by flags/env at init time are written active.
    """
    lines = [
        "# dsi-node configuration (TOML). Precedence: this file < environment < flags.",
        "# `dsi-node config show` prints the effective value of each key and its source.",
        "# Reference: docs/config.md.",
        "",
    ]
    for key in KEYS:
        if key.name == "cache_dir" and not include_cache_dir:
            lines += [f"# {line}" for line in _wrap(key.doc)]
            lines += ["# cache_dir is where this file lives; set it only in a file given with",
                      "# --config or DSI_CONFIG.", ""]
            continue
        lines += [f"# {line}" for line in _wrap(key.doc)]
        lines.append(f"# env: {key.env}   flag: {key.flag}")
        rendered = f"{key.name} = {_toml_value(settings.values[key.name])}"
        if settings.sources[key.name] == "default":
            rendered = "\n".join(f"# {line}" for line in rendered.splitlines())
        lines += [rendered, ""]
    return "\n".join(lines)


def _wrap(text: str, width: int = 96) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width) or [""]
