"""dsi node: configuration, identity, storage, provenance, task queue, P2P host and CLI.

Trio users: ``async with open_node(config) as node: ...`` (see ``node.p2p``).
Everything else reaches the local services through ``acquire_services``.
"""

from node.config import NodeConfig, build_config
from node.errors import DatasetsError
from node.services import NodeServices, acquire_services, release_services

__all__ = [
    "DatasetsError",
    "NodeConfig",
    "NodeServices",
    "acquire_services",
    "build_config",
    "open_node",
    "release_services",
]


def __getattr__(name: str):  # lazy: importing libp2p costs ~1 s, only P2P users pay it
    if name == "open_node":
        from node.p2p import open_node

        return open_node
    raise AttributeError(name)
