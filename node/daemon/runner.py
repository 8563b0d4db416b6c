"""``dsi-node run`` and ``dsi-node init``: the daemon's life cycle.

run: lock the data directory, open the services, start the P2P host (if enabled), serve the
control API, publish ``control.json``, then wait for SIGINT/SIGTERM. Stopping: refuse new
claims, give workers ``shutdown_grace`` seconds to finish the leases they hold through this
daemon, hand back the rest (fail, retryable: the owner re-offers them at once instead of after
lease expiry), stop the API, stop the host, release the lock. A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from node.daemon.api import VERSION, NodeAPI
from node.daemon.lock import DaemonLock
from node.daemon.server import ControlServer
from node.daemon.settings import CONFIG_FILE_NAME, Settings, render_config_file
from node.errors import ConfigError, DatasetsError

log = logging.getLogger("dsi.daemon")

_MAINTENANCE_EVERY = 2.0  # seconds between lease reaps
_SYNC_EVERY = 30.0  # seconds between pushes of locally queued blocks to Kubo
_STOP_HOST_TIMEOUT = 10.0


def configure_logging(level: str) -> None:
    """Plain timestamped lines on stderr; libp2p's chatter only from warnings up."""
    root = logging.getLogger()
    if not any(getattr(h, "_dsi", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"))
        handler._dsi = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("libp2p", "multiaddr", "async_service", "trio-websocket"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def ensure_token(path: Path) -> str:
    """The control token (created 0600 once; a looser mode is tightened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        token = path.read_text("utf-8").strip()
        if token:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", "utf-8")
    os.replace(tmp, path)


# -- addresses to give other machines -----------------------------------------------------
def _local_ipv4s() -> list[str]:
    """This machine's IPv4 addresses, the default-route one first (no packet is sent)."""
    found: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the outgoing interface
        found.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.append(str(info[4][0]))
    out = []
    for ip in found:
        if ip not in out and not ip.startswith("127."):
            out.append(ip)
    return out or ["127.0.0.1"]


def dialable_addrs(addrs: list[str], peer_id: str) -> list[str]:
    """Full multiaddrs (``/p2p/<id>``) other machines can dial: 0.0.0.0 becomes real IPs."""
    out: list[str] = []
    for addr in addrs:
        base = addr.split("/p2p/")[0]
        parts = base.split("/")
        if len(parts) >= 3 and parts[1] == "ip4" and parts[2] == "0.0.0.0":
            bases = ["/".join([*parts[:2], ip, *parts[3:]]) for ip in _local_ipv4s()]
        elif len(parts) >= 3 and parts[1] == "ip6" and parts[2] == "::":
            bases = ["/".join([*parts[:2], "::1", *parts[3:]])]
        else:
            bases = [base]
        for b in bases:
            full = f"{b}/p2p/{peer_id}"
            if full not in out:
                out.append(full)
    return out


# -- init ---------------------------------------------------------------------------------
def init_node(settings: Settings, *, force: bool = False) -> dict[str, Any]:
    """Create the identity key, a commented config file and the control token."""
    from node.identity import load_or_create_identity

    cfg = settings.node
    cfg.ensure_dirs()
    had_key = cfg.identity_path.exists()
    identity = load_or_create_identity(cfg.identity_path)
    default_file = cfg.cache_dir / CONFIG_FILE_NAME
    target = settings.config_file or default_file
    wrote = False
    if force or not target.exists():
        text = render_config_file(settings, include_cache_dir=target != default_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text, "utf-8")
        os.replace(tmp, target)
        wrote = True
    ensure_token(cfg.control_token_path)
    addrs = dialable_addrs(list(cfg.listen_addrs), identity.peer_id)
    return {
        "peer_id": identity.peer_id,
        "cache_dir": str(cfg.cache_dir),
        "identity_created": not had_key,
        "config_file": str(target),
        "config_written": wrote,
        "bootstrap_addrs": addrs,
        "port_chosen_at_start": any(a.split("/p2p/")[0].endswith("/tcp/0") for a in addrs),
    }


# -- run ----------------------------------------------------------------------------------
class Daemon:
    """One running node: services, optional P2P host, control API. ``run()`` blocks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.node
        self.lock = DaemonLock(self.cfg.daemon_lock)
        self.stop_event = threading.Event()
        self.server: ControlServer | None = None
        self.api: NodeAPI | None = None
        self._services: Any = None
        self._signals = 0

    # signal handling: first signal stops gracefully, a second one exits at once
    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s received: stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def run(self) -> int:
        from node.services import acquire_services, release_services

        cfg = self.cfg
        cfg.ensure_dirs()
        self.lock.acquire()  # NodeRunningError names the holder's pid
        control_file = self.settings.control_file
        control_file.unlink(missing_ok=True)
        try:
            token = ensure_token(cfg.control_token_path)
            services = self._services = acquire_services(cfg)
            log.info("dsi-node %s, peer id %s, data directory %s", VERSION, services.peer_id,
                     cfg.cache_dir)
            if self.settings.config_file:
                log.info("config file %s", self.settings.config_file)
            p2p = None
            if cfg.enable_p2p:
                p2p = services.p2p()
                addrs = _listen_addrs(p2p)
                for addr in dialable_addrs(addrs, services.peer_id) if addrs else []:
                    log.info("listening on %s", addr)
                if cfg.bootstrap_peers:
                    log.info("bootstrap peers: %s", ", ".join(cfg.bootstrap_peers))
            else:
                log.info("P2P is off (enable with --enable-p2p or enable_p2p = true)")
            self._log_storage(services)
            started = time.time()
            daemon_info: dict[str, Any] = {"running": True, "pid": os.getpid(),
                                           "started_at": started}
            self.api = NodeAPI(services, settings=self.settings, daemon=daemon_info)
            try:
                self.server = ControlServer(self.settings.control_host,
                                            self.settings.control_port, self.api, token)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on control_addr {self.settings['control_addr']} ({exc}); "
                    "choose another with --control-addr 127.0.0.1:PORT (0 = any free port)"
                ) from None
            daemon_info["control_url"] = self.server.url
            self.server.start()
            _write_json_atomic(control_file, {
                "url": self.server.url, "pid": os.getpid(), "peer_id": services.peer_id,
                "started_at": started, "version": VERSION, "p2p": p2p is not None})
            log.info("control API on %s (token in %s)", self.server.url,
                     cfg.control_token_path)
            log.info("ready")
            self._maintain_until_stopped(services)
            self._shutdown(release_services)
        finally:
            if self.server is not None:
                with contextlib.suppress(Exception):
                    self.server.server_close()
            self._unpublish(control_file)
            self.lock.release()
        log.info("stopped")
        return 0

    def _log_storage(self, services: Any) -> None:
        try:
            if services.blocks.kubo_available():
                info = services.blocks.kubo_info() or {}
                log.info("Kubo RPC API at %s answers (%s)", self.cfg.ipfs_api,
                         info.get("AgentVersion", "unknown agent"))
            else:
                log.info("no Kubo RPC API at %s: storing locally, syncing when it answers",
                         self.cfg.ipfs_api)
        except Exception as exc:  # storage trouble must not keep the node from starting
            log.warning("storage probe failed: %s: %s", type(exc).__name__, exc)

    def _maintain_until_stopped(self, services: Any) -> None:
        """Reap expired leases and push queued blocks to Kubo until asked to stop.

        Short waits: a signal handler runs only when the main thread gets control back, so
        the slice length bounds how fast SIGTERM is noticed.
        """
        next_reap = time.monotonic() + _MAINTENANCE_EVERY
        next_sync = time.monotonic() + _SYNC_EVERY
        while not self.stop_event.wait(0.1):
            now = time.monotonic()
            if now < next_reap:
                continue
            next_reap = now + _MAINTENANCE_EVERY
            try:
                services.tasks.reap_expired()
                if now >= next_sync:
                    next_sync = now + _SYNC_EVERY
                    blocks = services.blocks
                    if hasattr(blocks, "sync") and blocks.kubo_available():
                        blocks.sync()
            except DatasetsError as exc:
                log.warning("maintenance: %s", exc)
            except Exception:
                log.exception("maintenance failed")

    def _shutdown(self, release_services: Any) -> None:
        api, server = self.api, self.server
        if api is not None:
            api.stop_accepting()
            deadline = time.monotonic() + float(self.settings["shutdown_grace"])
            while api.held_leases() and time.monotonic() < deadline:
                time.sleep(0.1)
            held = api.held_leases()
            if held:
                peer = self._services.peer_id if self._services else "this node"
                released = api.release_held_leases(
                    f"dsi-node on {peer} stopped before the task finished; retrying elsewhere")
                log.info("handed back %d leased task(s): %s", len(released),
                         ", ".join(released))
        if server is not None:
            server.stop()
        if self._services is not None:
            stopper = threading.Thread(target=release_services, args=(self._services,),
                                       name="dsi-stop-services", daemon=True)
            stopper.start()
            stopper.join(_STOP_HOST_TIMEOUT)
            if stopper.is_alive():
                log.error("the P2P host did not stop within %.0f s; exiting anyway",
                          _STOP_HOST_TIMEOUT)

    def _unpublish(self, control_file: Path) -> None:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            info = json.loads(control_file.read_text("utf-8"))
            if info.get("pid") == os.getpid():
                control_file.unlink()


def _listen_addrs(p2p: Any) -> list[str]:
    attr = getattr(p2p, "listen_addrs", None)
    if attr is None:
        return []
    try:
        value = attr() if callable(attr) else attr
    except DatasetsError as exc:
        log.warning("could not read the listen addresses: %s", exc)
        return []
    return [str(a) for a in value]


def run_daemon(settings: Settings) -> int:
    configure_logging(settings["log_level"])
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    return daemon.run()
