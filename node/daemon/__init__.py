"""The ``dsi-node`` daemon: settings with provenance, data-directory lock, control API.

``load_settings`` resolves defaults < TOML file < environment < flags; ``run_daemon`` runs a
node until SIGINT/SIGTERM; ``NodeAPI`` is the one implementation of every operation, served
over HTTP by ``ControlServer`` and reached from other processes with ``ControlClient``.
"""

from node.daemon.api import NodeAPI, node_status
from node.daemon.client import ControlClient, no_daemon_error, read_control_file
from node.daemon.lock import DaemonLock
from node.daemon.runner import Daemon, dialable_addrs, ensure_token, init_node, run_daemon
from node.daemon.server import ControlServer, load_openapi
from node.daemon.settings import KEYS, Settings, control_file_path, load_settings

__all__ = [
    "KEYS",
    "ControlClient",
    "ControlServer",
    "Daemon",
    "DaemonLock",
    "NodeAPI",
    "Settings",
    "control_file_path",
    "dialable_addrs",
    "ensure_token",
    "init_node",
    "load_openapi",
    "load_settings",
    "no_daemon_error",
    "node_status",
    "read_control_file",
    "run_daemon",
]
